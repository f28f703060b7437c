"""Errors that are the user's to fix.

Every problem with what the user gave us (paths, files, options) raises a subclass of
:class:`DeepCADError` whose message is one self-contained line. The command line prints that
line and exits non-zero; anything else is a bug and is reported as such.
"""

from __future__ import annotations


class DeepCADError(Exception):
    """Base class of all errors caused by user input or by the state of the user's files."""


class SourceError(DeepCADError):
    """A source file is missing, unreadable, not a TIFF, truncated, or inconsistent."""


class StoreError(DeepCADError):
    """A Zarr store is missing, not a deepcad-chunked recording, or incomplete."""


class DamagedStoreError(StoreError):
    """A store's chunks are missing or do not decode, or its metadata disagrees with what was
    written: its data cannot be trusted. ``detail`` says what is wrong in a few words."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


class IncompleteStoreError(StoreError):
    """A store exists but its completion flag was never written."""


class OutputExistsError(DeepCADError):
    """The output exists and ``overwrite`` was not given."""


class ConfigError(DeepCADError):
    """An option value cannot work."""


class LockedError(DeepCADError):
    """Another process is writing the output (it holds the output's writer lock)."""


class TrainingError(DeepCADError):
    """Training cannot go on (its loss or weights stopped being finite)."""


class ModelOutputError(DeepCADError):
    """The network produced values that cannot be stored as a result (NaN or infinite)."""
