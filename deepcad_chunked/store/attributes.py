"""The attributes a store of ours carries, as one validated model read in one place.

Every store this package writes holds, under the group attribute ``deepcad_chunked``, what
the jobs need to know about it: whether it is complete, the job that wrote it (its command,
identity and fingerprint), the statistics, the provenance, the shape it was finished with,
the normalisation a denoised store was made with. :func:`read_ours` returns them as a
:class:`StoreAttributes`; keys this version does not know are kept (``model_extra``), so
stores written by a newer version still open, and stores written before a key existed read
its default. They are written by :func:`~deepcad_chunked.store.omezarr.update_attrs` (a
merge) and :class:`~deepcad_chunked.store.lifecycle.StoreJob` (the completion flag last).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepcad_chunked.errors import DamagedStoreError
from deepcad_chunked.store.location import StorePath
from deepcad_chunked.store.omezarr import ATTRS_KEY, read_group_attrs


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any, info: Any) -> Any:
        """A key written as ``null`` reads as its default, as a missing one does."""
        if value is None:
            field = cls.model_fields[info.field_name]
            return field.get_default(call_default_factory=True)
        return value


class JobRecord(_Record):
    """The job that writes or wrote the store.

    Attributes
    ----------
    command : str or None
        ``convert``, ``denoise``, ``follow``, …
    identity : dict
        What the job was asked to do (inputs, options): a rerun with another identity does
        not resume it.
    fingerprint : str or None
        Digest of ``identity``.
    """

    command: str | None = None
    identity: dict[str, Any] = Field(default_factory=dict)
    fingerprint: str | None = None


class Provenance(_Record):
    """Where the store's data came from and when it was completed (other keys kept as
    written: tool, version, host, …).

    Attributes
    ----------
    completed : str or None
        When the completion flag was written (ISO 8601).
    sources : list of dict
        The files a recording was converted from (``path``, ``frames``).
    input : str or None
        The recording a denoised store was made from.
    """

    completed: str | None = None
    sources: list[dict[str, Any]] = Field(default_factory=list)
    input: str | None = None


class StoreAttributes(_Record):
    """The ``deepcad_chunked`` attributes of one of our stores.

    Attributes
    ----------
    complete : bool
        The completion flag, written last.
    job : JobRecord
    provenance : Provenance
    statistics : dict or None
        Whole-recording statistics (recordings; denoised stores have none).
    shape : list of int or None
        The array shape the store was finished with.
    normalization : dict or None
        The normalisation a denoised store was made with (``follow``).
    frame_interval_s, frame_rate_hz : float or None
        Seconds between time points, and time points per second.
    pixel_size_um : list of float or None
        ``[y, x]`` micrometres per pixel.
    z_spacing_um : float or None
        Micrometres between planes.
    model : dict or None
        The model a denoised store was made with (``path``, ``digest``).
    origin : dict or None
        Metadata of the source format kept for export (an NWB file's session, device, …).
    """

    complete: bool = False
    job: JobRecord = Field(default_factory=JobRecord)
    provenance: Provenance = Field(default_factory=Provenance)
    statistics: dict[str, Any] | None = None
    shape: list[int] | None = None
    normalization: dict[str, Any] | None = None
    frame_interval_s: float | int | None = None
    frame_rate_hz: float | int | None = None
    pixel_size_um: list[float | int] | None = None
    z_spacing_um: float | int | None = None
    model: dict[str, Any] | None = None
    origin: dict[str, Any] | None = None

    @property
    def written_shape(self) -> tuple[int, ...] | None:
        """The shape a complete store was finished with (recorded at completion; a
        conversion's job identity for stores from before that), or None when unknown."""
        shape = self.shape or self.job.identity.get("shape")
        if isinstance(shape, list) and all(isinstance(n, int) for n in shape):
            return tuple(shape)
        return None

    def as_dict(self) -> dict[str, Any]:
        """The attributes as stored (JSON types), unknown keys included."""
        return self.model_dump(mode="json")


def parse_ours(ours: dict[str, Any], where: str) -> StoreAttributes:
    """Our attributes ``ours`` (as read from a store's metadata) as a model.

    Raises
    ------
    DamagedStoreError
        When they cannot be ours as written (a value of the wrong type): edited by hand,
        or damaged.
    """
    try:
        return StoreAttributes.model_validate(ours)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise DamagedStoreError(f"{where} is damaged: its attribute {ATTRS_KEY}.{key} "
                                f"cannot be read ({first['msg']}); write it again or restore "
                                "it from a copy") from None


def read_ours_as_stored(path: StorePath) -> dict[str, Any]:
    """Our attributes of the store at ``path`` exactly as stored (what a job merges its
    changes into), ``{}`` when it has none."""
    ours = (read_group_attrs(path) or {}).get(ATTRS_KEY)
    return dict(ours) if isinstance(ours, dict) else {}


def ours_in(attrs: dict[str, Any] | None, where: str) -> StoreAttributes | None:
    """Our attributes among a store's group attributes ``attrs`` (as
    :func:`~deepcad_chunked.store.omezarr.read_group_attrs` returns them); None when there
    are none of ours.

    Raises
    ------
    DamagedStoreError
        For attributes of ours that cannot be read (:func:`parse_ours`).
    """
    ours = (attrs or {}).get(ATTRS_KEY)
    return parse_ours(ours, where) if isinstance(ours, dict) else None


def read_ours(path: StorePath) -> StoreAttributes | None:
    """The attributes of the store of ours at ``path``; None when ``path`` holds no Zarr
    metadata, or a store written by another tool.

    Raises
    ------
    DamagedStoreError
        For attributes of ours that cannot be read (:func:`parse_ours`).
    """
    return ours_in(read_group_attrs(path), str(path))
