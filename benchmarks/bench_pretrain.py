"""VoCo pre-training step benchmark: step time, crops/s, peak memory and FLOP rate per method and model size.

Each configuration runs in its own subprocess (so the peak RSS is its own), builds the real SSL student / teacher
(``voco.train.pretrain_ssl.build_ssl``) and times the real step function (``make_step``: forward of all crops, EMA
teacher, VoCo loss, backward, AdamW step) on VoCo views of a synthetic volume. FLOPs per step come from
``torch.utils.flop_counter`` (forward + backward); the achieved rate is compared with the CPU's nominal fp32 peak
(cores x clock x FMA width, from /proc/cpuinfo) or, on CUDA, with the GPU's dense bf16 peak from a small table.

    python benchmarks/bench_pretrain.py                       # cnn_small + swinunetr-B at 64^3 (slow on CPU)
    python benchmarks/bench_pretrain.py --quick               # cnn_small + swinunetr F=12 (one timed step)
    python benchmarks/bench_pretrain.py --configs cnn_small:24:voco --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# name:roi:method[:feature_size[:batch]]
DEFAULT_CONFIGS = ["cnn_small:24:voco", "cnn_small:32:voco", "cnn_small:24:voco-v1", "swinunetr:64:voco:48:1"]
QUICK_CONFIGS = ["cnn_small:24:voco", "cnn_small:24:voco-v1", "swinunetr:64:voco:12:1"]

# dense peak TFLOP/s (bf16 tensor cores) for GPUs we may be lent
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "V100": 125.0, "L40S": 362.0}


def cpu_peak_gflops(threads: int) -> tuple[float, str]:
    """Nominal fp32 peak of ``threads`` cores: cores x GHz x FLOPs/cycle (AVX-512: 64, AVX2+FMA: 32, else 8)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", text)]
    flags = re.search(r"flags\s*:\s*(.*)", text)
    flags_set = set(flags.group(1).split()) if flags else set()
    per_cycle = 64 if "avx512f" in flags_set else 32 if {"avx2", "fma"} <= flags_set else 8
    ghz = (max(mhz) / 1000.0) if mhz else 2.5
    model = re.search(r"model name\s*:\s*(.*)", text)
    return (
        threads * ghz * per_cycle,
        f"{model.group(1).strip() if model else 'CPU'} ({threads} threads, {ghz:.2f} GHz, {per_cycle} FLOP/cycle)",
    )


def run_one(spec: str, steps: int, threads: int, sw: int) -> dict:
    """Benchmark one configuration in this process (called in a subprocess)."""
    import resource

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from voco.ssl.crops import collate_views, sample_voco_views
    from voco.train.pretrain_ssl import VOCO_DEFAULTS, build_ssl, make_step

    torch.set_num_threads(threads)
    parts = spec.split(":")
    name, roi, method = parts[0], int(parts[1]), parts[2]
    feature = int(parts[3]) if len(parts) > 3 and parts[3] else None
    batch = int(parts[4]) if len(parts) > 4 else 2
    ssl = dict(VOCO_DEFAULTS[method])
    if method == "voco-v1":
        ssl.update({"roi": roi, "out_size": roi})
    else:
        ssl.update({"roi": roi})
    ssl["sw"] = sw
    cfg = {"model": {"name": name, "size": "B", "feature_size": feature}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    student, teacher = build_ssl(cfg, method, ssl)
    student.to(device).train()
    teacher.to(device)
    step = make_step(method, teacher, ssl)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, amsgrad=True)
    g, r = int(ssl["grid"]), int(ssl["roi"])
    rng = np.random.default_rng(0)
    vol_shape = (g * r + 8, g * r + 8, r + 4) if method == "voco" else (2 * g * r, 2 * g * r, r)
    vol = rng.random(vol_shape, dtype=np.float32)
    views = [
        sample_voco_views(vol, g, r, sw, rng, method, **({"out_size": r} if method == "voco-v1" else {}))
        for _ in range(batch)
    ]
    b = {k: v.to(device) for k, v in collate_views(views).items()}
    n_crops = b["rand"].shape[0] + b["base"].shape[0]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        if amp is not None:
            with amp:
                out = step(student, b)
        else:
            out = step(student, b)
        out["total"].backward()
        opt.step()
        teacher.update(student if method == "voco-v1" else student.projector)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    one()  # warm-up (allocator, kernels)
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        sync()
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as fc:
        one()
    flops = float(fc.get_total_flops())
    step_s = float(np.median(times))
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = {
        "config": spec,
        "model": name,
        "feature_size": student.backbone.feature_size,
        "roi": r,
        "method": method,
        "batch": batch,
        "sw": sw,
        "crops_per_step": n_crops,
        "threads": threads,
        "device": str(device),
        "warmup_step_s": warm_s,
        "step_s": step_s,
        "step_s_all": times,
        "crops_per_s": n_crops / step_s,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / 1e9 / step_s,
        "peak_rss_gib": peak_rss_gib,
    }
    if device.type == "cuda":
        res["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in gpu), None)
        res["hardware"] = gpu
        res["peak_gflops"] = peak * 1000 if peak else None
    else:
        res["peak_gflops"], res["hardware"] = cpu_peak_gflops(threads)
    res["flop_utilisation"] = res["achieved_gflops"] / res["peak_gflops"] if res.get("peak_gflops") else None
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="name:roi:method[:feature[:batch]] (default: a CPU set)")
    p.add_argument("--quick", action="store_true", help="small set, SwinUNETR at feature 12 (minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up step)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--sw", type=int, default=2, help="random crops per volume")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config in this process
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a.steps, a.threads, a.sw)))
        return 0
    configs = a.configs or (QUICK_CONFIGS if a.quick else DEFAULT_CONFIGS)
    results = []
    for spec in configs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            spec,
            "--steps",
            str(a.steps),
            "--threads",
            str(a.threads),
            "--sw",
            str(a.sw),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(f"{spec}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads(line[len("RESULT ") :])
        results.append(res)
        print(
            f"{spec}: {res['step_s']:.3f} s/step, {res['crops_per_s']:.1f} crops/s, {res['peak_rss_gib']:.2f} GiB",
            file=sys.stderr,
        )
    hw = results[0]["hardware"] if results else "?"
    print(f"\nVoCo pre-training step on {hw}\n")
    print(
        "| config | model (F) | method | crops/step | s/step | crops/s | GFLOP/step | GFLOP/s | of peak | peak RSS GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        util = f"{100 * r['flop_utilisation']:.1f} %" if r.get("flop_utilisation") is not None else "n/a"
        print(
            f"| {r['config']} | {r['model']} ({r['feature_size']}) | {r['method']} | {r['crops_per_step']} | "
            f"{r['step_s']:.3f} | {r['crops_per_s']:.1f} | {r['gflop_per_step']:.1f} | {r['achieved_gflops']:.1f} | "
            f"{util} | {r['peak_rss_gib']:.2f} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
