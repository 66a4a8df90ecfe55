"""DDP helpers: process-group set-up from ``torchrun`` environment variables, rank queries, reductions, re-exec.

Single-process runs need nothing: every helper degrades to the obvious value (rank 0, world size 1).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """True when launched by torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from torchrun's environment; no-op (False) for a single process.

    Backend: NCCL when CUDA is available, gloo otherwise (CPU tests and laptops).
    """
    if is_initialized():
        return True
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info("DDP: rank %d / %d (local rank %d), backend %s", rank(), world_size(), local_rank(), backend)
    return True


def cleanup() -> None:
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float | torch.Tensor], device: torch.device | None = None) -> dict[str, float]:
    """Average scalar values over ranks (one collective); returns Python floats."""
    keys = list(values)
    if not keys:
        return {}
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if is_initialized() and world_size() > 1:
        if dist.get_backend() == "nccl":
            vec = vec.to(device or default_device())
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vec = vec.cpu() / world_size()
    return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (list indexed by rank); ``[obj]`` for a single process."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def visible_gpus() -> int:
    """GPUs this job may use: CUDA_VISIBLE_DEVICES if set, else torch's count (0 without CUDA)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(nproc: str | int | None) -> int:
    """``--nproc`` value -> process count: ``auto`` = visible GPUs (at least 1); 0 or None = 1."""
    if nproc is None:
        return 1
    if str(nproc) == "auto":
        return max(1, visible_gpus())
    return max(1, int(nproc))


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "voco.cli") -> list[str]:
    """The command that re-runs ``python -m <module> <argv>`` under ``torchrun --standalone`` on one node."""
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if shutil.which("torchrun") and os.path.dirname(shutil.which("torchrun") or "") == os.path.dirname(sys.executable):
        launcher = [str(shutil.which("torchrun"))]
    return [*launcher, "--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv]


def relaunch_under_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Replace this single process by ``nproc`` DDP workers (torchrun) running the same CLI call; returns its exit code.

    Call only when ``nproc > 1`` and not already under torchrun. ``argv`` is the ``voco`` argument list (without the
    program name); the workers see torchrun's environment, so the same ``--nproc`` flag does not relaunch again.
    """
    import subprocess

    cmd = torchrun_command(nproc, argv)
    log.info("launching %d DDP processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)
