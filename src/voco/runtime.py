"""CPU runtime settings of a voco process: OpenMP waiting and glibc malloc, applied by ``import voco``.

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
  every time, so the heap stops growing after the first step.

A value the user set wins: an environment variable already present is left alone, and the malloc settings are skipped
when ``MALLOC_*`` / ``GLIBC_TUNABLES`` malloc settings are in the environment. ``VOCO_CPU_RUNTIME=0`` turns all of it
off. Non-glibc systems get the environment default only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import MutableMapping

#: environment defaults read by the OpenMP runtime when torch loads
ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

# glibc mallopt parameters (malloc.h); a trim threshold of -1 turns trimming off (mallopt(3))
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: dict[str, str] | None = None


def _user_set_malloc(environ: MutableMapping[str, str]) -> bool:
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


def configure(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply the settings above once per process; returns what was applied (name -> value).

    Args:
        environ: the environment to read and complete (default ``os.environ``; the malloc settings apply to this
            process whatever mapping is given).
    """
    global _applied
    env = os.environ if environ is None else environ
    if _applied is not None and environ is None:
        return dict(_applied)
    applied: dict[str, str] = {}
    if env.get("VOCO_CPU_RUNTIME", "1").strip().lower() in ("0", "off", "false", "no"):
        _applied = applied if environ is None else _applied
        return applied
    if "torch" not in sys.modules:  # OpenMP reads its variables when torch's libraries load
        for key, value in ENV_DEFAULTS.items():
            if key not in env:
                env[key] = value
                applied[key] = value
    if sys.platform.startswith("linux") and not _user_set_malloc(env):
        if _mallopt(M_MMAP_MAX, 0):
            applied["malloc.mmap_max"] = "0"
        if _mallopt(M_TRIM_THRESHOLD, -1):
            applied["malloc.trim_threshold"] = "-1 (no trimming)"
    if environ is None:
        _applied = applied
    return dict(applied)


def applied() -> dict[str, str]:
    """What ``configure`` applied in this process (empty before it ran or when turned off)."""
    return dict(_applied or {})
