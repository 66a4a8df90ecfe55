"""Stop requests: SIGTERM and SIGUSR1 ask a training job to finish the step in flight, checkpoint and exit.

SLURM sends SIGTERM at the time limit (SIGKILL follows after ``KillWait``, 30 s by default), on preemption and on
``scancel``; the SLURM profile asks for SIGTERM a few minutes *before* the limit (``--signal=TERM@300``), and users
commonly ask for SIGUSR1. Either signal only sets a flag here; the training loop (:mod:`voco.train.loop`) looks at it
after every optimiser step, writes ``last.pt`` atomically and raises :class:`voco.errors.Interrupted`, which the CLI
turns into exit status :data:`voco.errors.EXIT_INTERRUPTED` (75, "interrupted, resumable"). Re-running the same
command resumes from that checkpoint, so at most the step in flight is lost.

Signals are process-wide, so is the flag: :func:`install` (idempotent, main thread only) is called by the training
commands before they build anything, and the loop installs it too when used as a library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class _Request:
    signal_name: str | None = None
    received_at: float | None = None  # time.monotonic() of the first stop signal
    count: int = 0


_request = _Request()
_previous: dict[int, object] = {}


def _handler(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name
    _request.count += 1
    if _request.signal_name is None:
        _request.signal_name, _request.received_at = name, time.monotonic()
    # os.write: safe inside a signal handler (no locks), and visible in the job log at once
    msg = f"voco: received {name}: finishing the step in flight, then checkpointing and exiting (status 75)\n"
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())


def install() -> bool:
    """Route SIGTERM and SIGUSR1 to the stop flag. Returns False (and does nothing) outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is not _handler:
            _previous[sig] = current
            signal.signal(sig, _handler)
    return True


def uninstall() -> None:
    """Restore the handlers that :func:`install` replaced (and forget any request)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_previous.items()):
        signal.signal(sig, prev if prev is not None else signal.SIG_DFL)  # type: ignore[arg-type]
        del _previous[sig]
    reset()


def ignore_in_worker(_worker_id: int = 0) -> None:
    """``DataLoader(worker_init_fn=...)``: loader workers ignore the stop signals.

    SLURM signals every process of a job step, loader workers included; a worker killed by SIGTERM makes PyTorch
    raise "DataLoader worker exited unexpectedly" in the training process, in the middle of the step that should
    finish and be checkpointed. The training process decides; its workers go when it does.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def installed() -> bool:
    return all(signal.getsignal(s) is _handler for s in STOP_SIGNALS)


def requested() -> str | None:
    """The name of the first stop signal received (``"SIGTERM"`` / ``"SIGUSR1"``), or None."""
    return _request.signal_name


def seconds_since_request() -> float | None:
    return None if _request.received_at is None else time.monotonic() - _request.received_at


def reset() -> None:
    """Forget a stop request (tests; a library caller that handled it)."""
    _request.signal_name, _request.received_at, _request.count = None, None, 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the handlers for the duration of the block when nobody did before; then restore them and forget the
    request (a library caller gets :class:`voco.errors.Interrupted` once, not again on its next call)."""
    mine = not installed() and install()
    try:
        yield
    finally:
        if mine:
            uninstall()
