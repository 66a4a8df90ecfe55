"""voco.runtime: OpenMP waiting and malloc settings of a voco process (user values win; can be turned off)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# a training-like loop on tensors above glibc's 32 MiB mmap limit: faults per step once warm, and what was set
PROBE = """
import json, os, resource, sys
import voco, torch
from voco import runtime
torch.set_num_threads(1)
if sys.argv[1] == "tune":
    runtime.configure_malloc()  # as voco.train.loop.train does on CPU
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 16, 3, padding=1))
x = torch.randn(2, 1, 64, 64, 64)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "applied": runtime.applied(), "omp": os.environ.get("OMP_WAIT_POLICY")}))
"""


def run_probe(mode: str = "tune", **env: str) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("OMP_WAIT_POLICY", "VOCO_CPU_RUNTIME") and not k.startswith("MALLOC_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=e, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_training_keeps_its_memory_mapped_and_import_sets_passive_waiting():
    tuned, plain, off = run_probe(), run_probe("plain"), run_probe(VOCO_CPU_RUNTIME="0")
    assert tuned["omp"] == "PASSIVE" and plain["omp"] == "PASSIVE" and off["omp"] is None
    assert tuned["applied"]["malloc.mmap_max"] == "0" and "malloc.mmap_max" not in plain["applied"]
    assert off["applied"] == {}
    # 33.5 MiB activations: by default glibc maps them afresh every step (100K+ page faults each); kept in the heap,
    # the heap settles within a few steps and then faults (almost) nothing
    assert min(plain["faults"][1:]) > 50000 and min(off["faults"][1:]) > 50000
    assert min(tuned["faults"][2:]) < 1000 and sum(tuned["faults"][1:]) < sum(plain["faults"][1:]) / 4


def test_user_values_win():
    got = run_probe(OMP_WAIT_POLICY="ACTIVE", MALLOC_ARENA_MAX="2")
    assert got["omp"] == "ACTIVE" and got["applied"] == {}


def test_malloc_settings_are_skipped_for_monais_own_attention():
    """The loop keeps freed memory in the heap only with our window attention: MONAI's per-window matrices fragment a
    heap that is never trimmed (peak 17.1 GiB instead of 9.5 in bench_vs_official's monai-attention variant)."""
    from voco.models import build_model
    from voco.train.loop import _has_monai_attention

    ours = build_model("swinunetr", 1, 2, feature_size=12)
    monai = build_model("swinunetr", 1, 2, feature_size=12, window_attention="monai")
    assert not _has_monai_attention(ours) and _has_monai_attention(monai)
    assert not _has_monai_attention(build_model("cnn_small", 1, 2))
