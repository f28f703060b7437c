"""Validated configuration objects of the package's jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepcad_chunked.errors import ConfigError

#: Default storage chunk (t, y, x); see benchmarks/RESULTS.md, "Chunk shape".
DEFAULT_CHUNKS: tuple[int, int, int] = (32, 128, 128)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(cls, **values: object) -> _Config:
        """Validate ``values``, raising :class:`ConfigError` with a one-line message."""
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or cls.__name__
            raise ConfigError(f"invalid {where}: {first['msg']}") from None


class CompressionConfig(_Config):
    """Blosc settings of stored chunks (defaults chosen in benchmarks/RESULTS.md)."""

    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: int = Field(1, ge=0, le=9)
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = "bitshuffle"


class ConvertConfig(_Config):
    """Options of :func:`deepcad_chunked.convert`.

    Attributes
    ----------
    chunks : (t, y, x) or None
        Storage chunk shape; ``None`` picks :data:`DEFAULT_CHUNKS`, clipped to the recording.
    zarr_format : {2, 3}
        Zarr v3 with NGFF 0.5 (default) or Zarr v2 with NGFF 0.4.
    frame_rate : float or None
        Frames per second, overriding the files' metadata.
    compression : CompressionConfig
        Chunk compressor.
    overwrite : bool
        Replace an existing output store.
    """

    chunks: tuple[int, int, int] | None = None
    zarr_format: Literal[2, 3] = 3
    frame_rate: float | None = Field(None, gt=0)
    compression: CompressionConfig = CompressionConfig()
    overwrite: bool = False

    @field_validator("chunks")
    @classmethod
    def _positive_chunks(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"chunk sizes must be positive, got {value}")
        return value
