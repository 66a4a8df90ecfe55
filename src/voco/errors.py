"""One exception type per user-facing failure family.

Messages name the file / key / case and, where there is one, the fix. The CLI turns any ``VocoError`` into a one-line
message on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VocoError(Exception):
    """Base of every error a user can cause (bad config, bad data, bad checkpoint ...)."""


class ConfigError(VocoError):
    """The configuration or a dataset card is invalid (names the key and the file)."""


class DataError(VocoError):
    """An input file is unreadable, inconsistent or out of range (names the file and the problem)."""


class DicomError(DataError):
    """A DICOM series cannot be turned into one consistent volume (missing slices, mixed series, ...)."""


class DownloadError(VocoError):
    """A download failed (HTTP error, checksum mismatch, unsafe archive ...)."""


class CheckpointError(VocoError):
    """A checkpoint cannot be read or does not fit the model."""


class ContainerError(VocoError):
    """The Apptainer definition is invalid, or the container cannot be built here (names the file / the tool)."""


class UnsafePathError(DataError):
    """An identifier or path would name something outside the folder the job was given (``..``, ``/``, NUL ...)."""
