"""CPU runtime settings of a voco process: OpenMP waiting (set by ``import voco``) and glibc malloc (set by training).

Two process-wide settings make a CPU training step much cheaper on a busy machine, and neither changes any result:

* ``OMP_WAIT_POLICY=PASSIVE``: an OpenMP worker that has finished its share sleeps instead of spinning. PyTorch runs
  thousands of short parallel regions per step; when the machine has more runnable threads than cores, a spinning
  worker burns the CPU share its partner thread needs, and a step costs 2-5x the CPU time (measured here at load
  average 5 on 2 cores, with MONAI's attention and with ours alike). OpenMP reads the variable when torch loads, so it
  is set before that (``voco/__init__.py`` calls ``configure`` first thing).
* glibc ``malloc`` keeps freed memory for reuse (``M_MMAP_MAX = 0``: large blocks come from the heap, not from fresh
  ``mmap`` regions; ``M_TRIM_THRESHOLD = -1``: the heap is not returned to the system after every step). By default
  every tensor above 32 MiB is mapped and unmapped on each step, and the kernel zeroes each page on first touch:
  millions of minor page faults and seconds of system time per VoCo step. A training step allocates the same sizes
  every time, so the heap stops growing after the first steps. Only training processes get this (the loop calls
  ``configure_malloc`` before its first step): with irregular allocation patterns a heap that never shrinks can hold
  more memory than the default.

A value the user set wins: an environment variable already present is left alone, and the malloc settings are skipped
when ``MALLOC_*`` / ``GLIBC_TUNABLES`` malloc settings are in the environment (the way to choose others).
``VOCO_CPU_RUNTIME=0`` turns all of it off. Non-glibc systems get the environment default only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

#: environment defaults read by the OpenMP runtime when torch loads
ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

# glibc mallopt parameters (malloc.h); a trim threshold of -1 turns trimming off (mallopt(3))
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: dict[str, str] = {}


def _user_set_malloc(environ: Mapping[str, str]) -> bool:
    return any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def _mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt``; False where there is no glibc or it refuses."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(fn(param, value))


def _enabled() -> bool:
    return os.environ.get("VOCO_CPU_RUNTIME", "1").strip().lower() not in ("0", "off", "false", "no")


def configure() -> dict[str, str]:
    """Set the OpenMP environment defaults (``import voco`` calls this before torch loads); returns what it set."""
    if not _enabled() or "torch" in sys.modules:  # OpenMP reads its variables when torch's libraries load
        return {}
    set_now = {}
    for key, value in ENV_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            set_now[key] = value
    _applied.update(set_now)
    return set_now


def configure_malloc() -> dict[str, str]:
    """Keep freed memory in this process's heap (glibc); the training loop calls this before its first step.

    Returns what it set (empty: turned off, set by the user, not glibc, or already done).
    """
    if not _enabled() or not sys.platform.startswith("linux") or _user_set_malloc(os.environ):
        return {}
    if "malloc.mmap_max" in _applied:
        return {}
    set_now = {}
    if _mallopt(M_MMAP_MAX, 0):
        set_now["malloc.mmap_max"] = "0"
    if _mallopt(M_TRIM_THRESHOLD, -1):
        set_now["malloc.trim_threshold"] = "-1 (no trimming)"
    _applied.update(set_now)
    return set_now


def applied() -> dict[str, str]:
    """What ``configure`` / ``configure_malloc`` set in this process."""
    return dict(_applied)
