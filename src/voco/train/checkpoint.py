"""Atomic, weights-only training checkpoints, RNG state capture (exact resume) and the run folder's life cycle.

A checkpoint is a dict with at least ``model``, ``optimizer``, ``scheduler``, ``ema`` (or None), ``scaler``, ``rng``
(one entry per rank), ``step``, ``data`` (epoch, batches consumed in it), ``stage``, ``method``, ``config``,
``identity`` (what makes two runs the same run: the config values the job reads, its init file's checksum, its data)
and ``metrics`` (the ``metrics.jsonl`` records so far, compressed: restored when the file went with a failed job).
Everything in it is a tensor or a plain Python value, so ``torch.load(weights_only=True)`` reads it back.

Files of a run folder (``RUN_FILES``; every other file there is left alone):

* ``last.pt``: the resumable checkpoint, written atomically (fsynced, renamed) every N steps, on a stop signal and at
  the end; the one it replaces is kept as ``previous.pt`` (the fallback when the newest is unreadable). Both stay
  until the job's outputs are complete as a group (:func:`finish_run`), so a job that dies after ``final.pt`` but before
  ``backbone.pt`` / ``summary.json`` resumes at its last step instead of step 0.
* ``final.pt``: the checkpoint of the finished run (a hard link of the last ``last.pt``, or a copy).
* the stage's outputs (``backbone.pt``, ``summary.json``, ``model.pt``, ``run.json``, ``transfer.json``) and the
  loop's ``metrics.jsonl`` / ``progress.png``.

A checkpoint whose recorded identity differs from the job's is never resumed: the job says what differs (config keys,
init checksum) and starts afresh, after removing the files above (and only those) from the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voco.errors import CheckpointError
from voco.io import atomic_path, fsync_dir, fsync_file, sha256_file

log = logging.getLogger(__name__)

LAST = "last.pt"
FINAL = "final.pt"
PREVIOUS = "previous.pt"
#: every file voco writes into a training run folder (the only ones it ever removes there)
RUN_FILES = (FINAL, LAST, PREVIOUS, "metrics.jsonl", "progress.png", "backbone.pt", "summary.json", "model.pt",
             "run.json", "transfer.json")
#: TensorBoard event files the metrics log writes beside metrics.jsonl (removed with it)
TENSORBOARD_PREFIX = "events.out.tfevents."


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors / plain values (weights-only serialisable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    version, py_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py_state), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((str(name), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(g)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has %d CUDA RNG states, %d devices visible: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def save_checkpoint(
    path: str | os.PathLike[str], state: dict[str, Any], previous: str | os.PathLike[str] | None = None
) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename (a crash never leaves a torn checkpoint).

    ``previous``: the file ``path`` held so far is first renamed to this name (kept as a fallback).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if previous is not None and path.is_file():
            fsync_file(tmp)
            os.replace(path, previous)
    return path


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Make ``dst`` the same file as ``src`` atomically: a hard link where the filesystem allows, else a copy."""
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dst


def run_files(run_dir: str | os.PathLike[str], names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """The files of ``names`` in ``run_dir`` that exist, and temporary files that atomic writes of them left behind."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        if not (entry.is_file() or entry.is_symlink()):
            continue
        if (entry.name in names or any(entry.name.startswith(f".{n}.") and ".tmp" in entry.name for n in names)
                or ("metrics.jsonl" in names and entry.name.startswith(TENSORBOARD_PREFIX))):
            found.append(entry)
    return sorted(found)


def remove_run_files(run_dir: str | os.PathLike[str], names: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Remove the files of :func:`run_files` (never a folder, never anything else) and return them."""
    removed = []
    for f in run_files(run_dir, names):
        if f.resolve().parent != Path(run_dir).resolve() and not f.is_symlink():
            continue  # paranoia: only entries directly inside the run folder
        f.unlink(missing_ok=True)
        removed.append(f)
    if removed:
        fsync_dir(run_dir)
    return removed


def remove_stale_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files that an atomic write killed mid-way left in the run folder (their target is intact)."""
    stale = [f for f in run_files(run_dir) if f.name.startswith(".")]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def finish_run(run_dir: str | os.PathLike[str], drop_final: bool = False) -> None:
    """The job's outputs are complete: drop the resumable checkpoints (``last.pt``, ``previous.pt``; ``final.pt`` too
    with ``drop_final``, for jobs whose outputs do not include it)."""
    for name in (LAST, PREVIOUS, *((FINAL,) if drop_final else ())):
        (Path(run_dir) / name).unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)


# ----------------------------------------------------------------------------------------------------- identity
def file_identity(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """``{"path", "sha256", "bytes"}`` of an input file (an init checkpoint, a manifest); None for None."""
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def normalise(obj: Any) -> Any:
    """A JSON round trip: tuples become lists, paths strings, numpy scalars numbers (comparable identities)."""
    from voco.io import _json_default

    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def identity_diff(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and the job's, one ``key: old -> new`` line per leaf.

    Files are compared by checksum: an init file's line names both sha256 prefixes.
    """
    if recorded is None:
        return ["the checkpoint records no run identity (written by an older voco)"]
    old, new = _flatten(normalise(recorded)), _flatten(normalise(current))
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b or key.endswith(".path") and key[: -len(".path")] + ".sha256" in new:
            continue  # a moved but identical file is the same input
        if key.endswith(".bytes"):
            continue  # implied by the checksum
        if key.endswith(".sha256"):
            a, b = str(a)[:12], str(b)[:12]
            lines.append(f"{key[: -len('.sha256')]} checksum {a} -> {b}")
            continue
        ra, rb = repr(a), repr(b)
        lines.append(f"{key}: {ra[:80]} -> {rb[:80]}")
    return lines


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Weights-only load on CPU; a missing or unreadable file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a voco training checkpoint (needs 'model' and 'step')")
    return state


def find_resume(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint file present: ``final.pt``, else ``last.pt``, else ``previous.pt``, else None."""
    run_dir = Path(run_dir)
    for name in (FINAL, LAST, PREVIOUS):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def find_checkpoint(
    run_dir: str | os.PathLike[str],
    identity: Mapping[str, Any] | None = None,
    stage: str | None = None,
    method: str | None = None,
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The checkpoint to resume from, read and checked; no side effects.

    Candidates, newest first: ``final.pt``, ``last.pt``, ``previous.pt``; an unreadable one is skipped with a warning
    (the next is the fallback). The first readable one decides.

    Returns:
        ``(path, state, [])`` to resume; ``(None, None, [])`` when there is nothing to resume; ``(None, None, diff)``
        when the checkpoint belongs to another run (``identity`` differs; ``diff`` names what): start afresh.
    Raises:
        CheckpointError: the checkpoint is of another stage / method (a wrong ``--out`` folder: refused, not removed).
    """
    run_dir = Path(run_dir)
    for name in (FINAL, LAST, PREVIOUS):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("%s; trying the previous checkpoint", e)
            continue
        for key, want in (("stage", stage), ("method", method)):
            if want is not None and state.get(key) not in (None, "", want):
                raise CheckpointError(
                    f"{path}: checkpoint of {key} {state.get(key)!r}, this run is {want!r}; "
                    "use another --out folder or delete it"
                )
        if identity is not None:
            diff = identity_diff(state.get("identity"), identity)
            if diff:
                return None, None, diff
        return path, state, []
    return None, None, []


def prepare_run_dir(
    run_dir: str | os.PathLike[str],
    identity: Mapping[str, Any] | None = None,
    stage: str | None = None,
    method: str | None = None,
    resume: bool = True,
    keep: tuple[str, ...] = (),
) -> tuple[Path | None, dict[str, Any] | None]:
    """Decide between resuming and starting afresh, and make the run folder say the same.

    Resume: the checkpoint of :func:`find_checkpoint` (same stage, method and identity). Afresh (nothing to resume, a
    checkpoint of another run, ``resume=False``): every file of :data:`RUN_FILES` is removed from ``run_dir`` (by rank
    0; every rank waits), so that nothing of an earlier run is left beside the new one; ``keep`` names files the
    caller already wrote for this run. Called by the training loop, and by stages before they write anything of their
    own into the run folder.

    Returns:
        ``(path, state)`` of the checkpoint to resume from, or ``(None, None)``.
    """
    from voco.train import distributed as dist

    run_dir = Path(run_dir)
    main = dist.is_main()
    if main:
        for f in remove_stale_temporaries(run_dir):
            log.info("removed %s (a temporary file of an interrupted write)", f)
    path, state, diff = find_checkpoint(run_dir, identity, stage, method) if resume else (None, None, [])
    if diff and main:
        log.warning(
            "%s holds a checkpoint of another run; starting afresh. What differs (checkpoint -> this job):\n  %s",
            run_dir, "\n  ".join(diff),
        )
    dist.barrier()
    if state is None and main:
        removed = remove_run_files(run_dir, tuple(n for n in RUN_FILES if n not in keep))
        if removed:
            log.info("starting from scratch: removed %s from %s", ", ".join(f.name for f in removed), run_dir)
    dist.barrier()
    return path, state


#: settings that change how a run is carried out, not what it computes: never a reason to start afresh
NOT_IDENTITY_KEYS = frozenset({"checkpoint_every", "log_every", "num_workers", "max_bad_steps", "run", "nproc",
                               "nodes", "device"})


def _strip(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _strip(v) for k, v in obj.items() if k not in NOT_IDENTITY_KEYS}
    return obj


def run_identity(
    config: Mapping[str, Any],
    init: str | os.PathLike[str] | None = None,
    data: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """The identity a run records in its checkpoints and compares on resume.

    Args:
        config: the settings the job reads (effective values: config sections after command-line flags), without
            the keys of :data:`NOT_IDENTITY_KEYS` (checkpoint interval, logging, loader workers ...).
        init: the file the run starts from (an init checkpoint): compared by sha256, not by path.
        data: name -> input file (e.g. each store's ``manifest.parquet``): compared by sha256.
    """
    return normalise({
        "config": _strip(config),
        "init": None if init is None else {"sha256": sha256_file(init), "path": str(init)},
        "data": {name: {"sha256": sha256_file(p)} for name, p in (data or {}).items()},
    })


def store_manifests(dirs: Any, prefix: str = "") -> dict[str, Path]:
    """``{<prefix><folder name>: <folder>/manifest.parquet}`` for the stores ``dirs`` (names made unique)."""
    out: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        name = f"{prefix}{d.name}"
        while name in out:
            name += "+"
        out[name] = d / "manifest.parquet"
    return out
