"""DDP helpers: process-group set-up from ``torchrun`` environment variables, rank queries, reductions, re-exec,
device choice.

Single-process runs need nothing: every helper degrades to the obvious value (rank 0, world size 1).

Launchers (:func:`relaunch`): one node = ``torchrun --standalone --nproc_per_node=N``; several nodes of a SLURM
allocation = ``srun`` (one task per node, inside the job's allocation) starting ``torchrun --nnodes=M`` on each node,
with a c10d rendezvous on the allocation's first node. The same path runs with one node (``--nodes 1``). torchrun
forwards SIGTERM / SIGUSR1 to the workers and waits :data:`SHUTDOWN_TIMEOUT_S` for their checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from voco.devices import DEVICES, select_device  # noqa: F401  (re-exported: the training code calls dist.select_device)

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


#: signals torchrun forwards to its workers (the defaults + SIGUSR1, a common SLURM warning signal)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
#: seconds torchrun waits for workers to finish their step and checkpoint before SIGKILL
SHUTDOWN_TIMEOUT_S = 55


def torchrun_command(
    nproc: int,
    argv: Sequence[str],
    module: str = "voco.cli",
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """The command that re-runs ``python -m <module> <argv>`` under torchrun.

    Without ``rdzv_endpoint``: ``--standalone`` on this node. With it: ``--nnodes`` nodes meeting at a c10d rendezvous
    on ``host:port`` (each node runs this same command).
    """
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if shutil.which("torchrun") and os.path.dirname(shutil.which("torchrun") or "") == os.path.dirname(sys.executable):
        launcher = [str(shutil.which("torchrun"))]
    opts = [f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}"]
    if rdzv_endpoint is None:
        opts += ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        opts += [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id or 'voco'}"]
    return [*launcher, *opts, "-m", module, *argv]


def _scontrol(*args: str) -> str:
    from voco.errors import ConfigError

    if shutil.which("scontrol") is None:
        raise ConfigError("--nodes needs SLURM's scontrol on PATH (run inside a SLURM job)")
    r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ConfigError(f"scontrol {' '.join(args)} failed: {r.stderr.strip()[:300]}")
    return r.stdout


def _fields(record: str) -> dict[str, str]:
    """``Key=Value`` pairs of one ``scontrol show -o`` record."""
    return dict(m.groups() for m in re.finditer(r"(\w+(?:/\w+)?)=(\S*)", record))


def slurm_allocation(job_id: str | None = None) -> dict[str, object]:
    """The current SLURM job's nodes, CPUs per node, GPUs per node and the first node's address.

    Read with ``scontrol`` (the Snakemake job-step executor strips most ``SLURM_*`` variables from a job's
    environment; ``SLURM_JOB_ID`` stays).
    """
    from voco.errors import ConfigError

    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise ConfigError("--nodes N launches through srun inside a SLURM allocation, but SLURM_JOB_ID is not set; "
                          "without SLURM use --nodes 0 (this node only)")
    job = _fields(_scontrol("show", "job", "-o", str(job_id)))
    hosts = [h for h in _scontrol("show", "hostnames", job.get("NodeList", "")).split() if h]
    if not hosts:
        raise ConfigError(f"SLURM job {job_id}: no nodes in its allocation ({job.get('NodeList')!r})")
    node = _fields(_scontrol("show", "node", "-o", hosts[0]))
    n_nodes = int(job.get("NumNodes", len(hosts)).split("-")[0])
    cpus = int(job.get("NumCPUs", "1"))
    gpus = 0
    m = re.search(r"gres/gpu(?::\w+)?=(\d+)", job.get("TRES", "") or job.get("AllocTRES", ""))
    if m:
        gpus = int(m.group(1)) // max(1, n_nodes)
    return {"job_id": str(job_id), "hosts": hosts, "nodes": n_nodes, "cpus_per_node": max(1, cpus // max(1, n_nodes)),
            "gpus_per_node": gpus, "head": node.get("NodeAddr") or hosts[0]}


def rendezvous_port(job_id: str) -> int:
    """A port for the c10d rendezvous, fixed per SLURM job (two jobs on one head node do not collide)."""
    return 20000 + int(re.sub(r"\D", "", str(job_id)) or 0) % 20000


def srun_command(nodes: int, nproc: int, argv: Sequence[str], alloc: dict[str, object]) -> list[str]:
    """``srun`` inside the current allocation: one torchrun per node, all meeting on the first node (c10d).

    ``--overlap``: the job's first step (the Snakemake job step that runs this command) keeps its resources; the
    torchrun step shares them. ``--kill-on-bad-exit``: one failed node stops the others.
    """
    from voco.errors import ConfigError

    if nodes > int(alloc["nodes"]):  # type: ignore[arg-type]
        raise ConfigError(f"--nodes {nodes}, but SLURM job {alloc['job_id']} has {alloc['nodes']} node(s): "
                          "give the rule the `nodes` resource (the profile's set-resources)")
    job_id = str(alloc["job_id"])
    cmd = ["srun", f"--jobid={job_id}", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
           f"--cpus-per-task={alloc['cpus_per_node']}", "--mem=0", "--kill-on-bad-exit=1"]
    if int(alloc["gpus_per_node"]):  # type: ignore[arg-type]
        cmd.append(f"--gpus-per-node={alloc['gpus_per_node']}")
    endpoint = f"{alloc['head']}:{rendezvous_port(job_id)}"
    return [*cmd, *torchrun_command(nproc, argv, nnodes=nodes, rdzv_endpoint=endpoint, rdzv_id=f"voco-{job_id}")]


def _run_forwarding_signals(cmd: Sequence[str]) -> int:
    """Run ``cmd``; SIGTERM / SIGUSR1 sent to this process are passed on to it. Returns its exit status, or
    :data:`voco.errors.EXIT_INTERRUPTED` when a stop signal arrived and the workers stopped (checkpointed) on it."""
    from voco.errors import EXIT_INTERRUPTED

    proc = subprocess.Popen(list(cmd))
    got: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        got.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if rc != 0 and got:
        log.warning("workers stopped on %s (launcher exit status %d): interrupted, resumable",
                    signal.Signals(got[0]).name, rc)
        return EXIT_INTERRUPTED
    return rc


def relaunch_under_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Replace this single process by ``nproc`` DDP workers (torchrun) running the same CLI call; returns its exit code.

    Call only when ``nproc > 1`` and not already under torchrun. ``argv`` is the ``voco`` argument list (without the
    program name); the workers see torchrun's environment, so the same ``--nproc`` flag does not relaunch again.
    """
    cmd = torchrun_command(nproc, argv)
    log.info("launching %d DDP processes: %s", nproc, " ".join(cmd))
    return _run_forwarding_signals(cmd)


def relaunch_under_srun(nodes: int, nproc: int, argv: Sequence[str]) -> int:
    """Run the same CLI call on ``nodes`` nodes of the current SLURM allocation x ``nproc`` processes each (srun +
    torchrun, c10d rendezvous on the first node); returns the exit status."""
    alloc = slurm_allocation()
    cmd = srun_command(nodes, nproc, argv, alloc)
    log.info("launching %d node(s) x %d DDP process(es) in SLURM job %s (head %s): %s", nodes, nproc,
             alloc["job_id"], alloc["head"], " ".join(cmd))
    return _run_forwarding_signals(cmd)


def cpu_count() -> int:
    """CPUs this process may use: SLURM_CPUS_PER_TASK in a SLURM step, else the CPU affinity mask, else os.cpu_count."""
    env = os.environ.get("SLURM_CPUS_PER_TASK")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str | None) -> int:
    """DataLoader workers: an int as given; ``auto`` = the CPUs of this job shared by the processes of this node,
    one left to the training process itself (``max(0, cpus / local processes - 1)``)."""
    from voco.errors import ConfigError

    if value is None:
        return 0
    if str(value) == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(0, cpu_count() // max(1, local) - 1)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"num_workers must be an integer >= 0 or 'auto', got {value!r}") from None
    if n < 0:
        raise ConfigError(f"num_workers must be >= 0, got {n}")
    return n

