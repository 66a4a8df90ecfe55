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


#: Exit status of a job that stopped on SIGTERM / SIGUSR1 after writing its resumable checkpoint: "interrupted,
#: resumable" (sysexits' EX_TEMPFAIL, "temporary failure, the user is invited to retry"). Re-running the same
#: command continues from the checkpoint; Snakemake's retry (the SLURM profile) does exactly that.
EXIT_INTERRUPTED = 75


class Interrupted(Exception):  # noqa: N818 - not an error: the job stopped on request and can resume
    """A training job stopped on a signal (SIGTERM / SIGUSR1) after checkpointing; the CLI exits with
    :data:`EXIT_INTERRUPTED`.

    Attributes:
        signal_name: the signal that asked the job to stop (e.g. ``"SIGTERM"``).
        step: the last completed optimiser step (the checkpoint's step), or None when no step ran.
        checkpoint: the checkpoint to resume from (None when nothing new was written).
    """

    def __init__(self, signal_name: str, step: int | None = None, checkpoint: object = None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f" after step {step}" if step is not None else ""
        ck = f"; resumable checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {signal_name}{where}{ck}: run the same command again to resume")
