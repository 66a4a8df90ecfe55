"""GPU readiness check (run by ``benchmarks/gpu_check.sh``): the CUDA / AMP (bf16) path of pre-training and fine-tuning.

Two parts, each usable alone:

``throughput``: the VoCo pre-training step (``voco.train.pretrain_ssl``: backbone on all crops, projector, EMA teacher,
VoCo loss, backward, AdamW) and a fine-tuning step (SwinUNETR segmentation forward, DiceCE, backward, AdamW) of
SwinUNETR-B under bf16 autocast, at 64^3 and 96^3, with our window attention and with MONAI's. Prints steps/s, crops/s,
peak GPU memory (``torch.cuda.max_memory_allocated``) and model FLOPs utilisation: model FLOPs of one step (forward +
backward, counted by ``torch.utils.flop_counter`` on the model with MONAI's attention, so the recomputation inside our
attention's backward is not counted as useful work) / step time / the GPU's dense bf16 peak (table in
``bench_pretrain.py``). A configuration that runs out of memory is reported as such and retried at half the batch.

``pipeline``: the user's path through the real CLI on synthetic phantoms: ``voco synth`` -> ``voco preprocess`` ->
``voco pretrain --method voco`` (SwinUNETR-B, 64^3, amp auto = bf16 on a bf16 GPU) -> ``voco finetune`` from its
``backbone.pt`` (96^3), a few steps each, and ``voco pretrain --nproc 2`` (DDP over two GPUs) when two are visible.
Checks exit codes, finite losses and that the log names the CUDA device; prints each run's logged speed.

``--smoke`` runs both parts on whatever device there is (CPU here) at toy sizes - a check that the script parses and
its code paths run, not a measurement (SwinUNETR F=12 at 64^3 with one volume; cnn_small for the pipeline).

    python benchmarks/gpu_check.py throughput --json out.json
    python benchmarks/gpu_check.py pipeline --work /tmp/gpu_check
    python benchmarks/gpu_check.py all --smoke --work /tmp/smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ------------------------------------------------------------------------------------------------ throughput
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gflops(device, threads: int) -> tuple[float | None, str]:
    """Dense bf16 peak of the GPU (or the CPU's nominal fp32 peak) in GFLOP/s, and the hardware's name."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_pretrain import GPU_PEAK_TFLOPS, cpu_peak_gflops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        return (peak * 1000 if peak else None), name
    return cpu_peak_gflops(threads)


def _pretrain_setup(feature: int, roi: int, batch: int, sw: int, attention: str, device):
    """Student, teacher, step function and one batch of VoCo views of synthetic volumes on ``device``."""
    import numpy as np
    import torch

    from voco.ssl.crops import collate_views, sample_voco_views
    from voco.train.pretrain_ssl import VOCO_DEFAULTS, build_ssl, make_step

    ssl = dict(VOCO_DEFAULTS["voco"], roi=roi, sw=sw)
    cfg = {"model": {"name": "swinunetr", "feature_size": feature, "window_attention": attention}}
    torch.manual_seed(0)
    student, teacher = build_ssl(cfg, "voco", ssl)
    student.to(device).train()
    teacher.to(device)
    step = make_step("voco", teacher, ssl)
    rng = np.random.default_rng(0)
    views = [sample_voco_views(rng.random((3 * roi + 8, 3 * roi + 8, roi + 4), dtype=np.float32), 3, roi, sw, rng,
                               "voco") for _ in range(batch)]
    b = {k: v.to(device) for k, v in collate_views(views).items()}
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, amsgrad=True)

    def forward_backward() -> torch.Tensor:
        out = step(student, b)
        out["total"].backward()
        return out["total"]

    def after() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(student.projector)

    return forward_backward, after, int(b["rand"].shape[0] + b["base"].shape[0]), student


def _finetune_setup(feature: int, roi: int, batch: int, attention: str, device, classes: int = 14):
    """SwinUNETR segmentation step (DiceCE, AdamW) on random crops and labels on ``device``."""
    import torch
    from monai.losses import DiceCELoss

    from voco.models import build_model

    torch.manual_seed(0)
    net = build_model("swinunetr", 1, classes, feature_size=feature, window_attention=attention).to(device).train()
    x = torch.randn(batch, 1, roi, roi, roi, device=device)
    y = torch.randint(0, classes, (batch, 1, roi, roi, roi), device=device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)

    def forward_backward() -> torch.Tensor:
        loss = loss_fn(net(x).float(), y)
        loss.backward()
        return loss

    def after() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward_backward, after, batch, net


def measure(kind: str, feature: int, roi: int, batch: int, sw: int, attention: str, steps: int, device,
            flops: float | None) -> dict[str, Any]:
    """Time ``steps`` steps after one warm-up step under bf16 autocast (CUDA) / fp32 (CPU)."""
    import torch

    if kind == "pretrain":
        fb, after, crops, _ = _pretrain_setup(feature, roi, batch, sw, attention, device)
    else:
        fb, after, crops, _ = _finetune_setup(feature, roi, batch, attention, device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one() -> float:
        if amp is not None:
            with amp():
                loss = fb()
        else:
            loss = fb()
        after()
        return float(loss.detach().float())

    t0 = time.perf_counter()
    losses = [one()]
    _sync(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(one())
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    res = {"kind": kind, "feature_size": feature, "roi": roi, "batch": batch, "crops_per_step": crops,
           "attention": attention, "warmup_s": warm, "step_s_all": times, "step_s": step_s,
           "steps_per_s": 1.0 / step_s, "crops_per_s": crops / step_s, "losses": losses,
           "finite": all(math.isfinite(v) for v in losses)}
    if device.type == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if flops:
        res["model_gflop_per_step"] = flops / 1e9
        res["achieved_tflops"] = flops / step_s / 1e12
    return res


def model_flops(kind: str, feature: int, roi: int, batch: int, sw: int, device, attention: str = "monai") -> float:
    """FLOPs of one step's forward + backward with MONAI's attention (the model's own arithmetic, no recomputation)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if kind == "pretrain":
        fb, _, _, _ = _pretrain_setup(feature, roi, batch, sw, attention, device)
    else:
        fb, _, _, _ = _finetune_setup(feature, roi, batch, attention, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    with FlopCounterMode(display=False) as fc:
        if amp is not None:
            with amp:
                fb()
        else:
            fb()
    return float(fc.get_total_flops())


def run_throughput(a: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from voco import runtime

    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
        runtime.configure_malloc()  # as the training loop does on CPU
    peak, hw = _peak_gflops(device, a.threads)
    print(f"throughput on {hw} ({device}), torch {torch.__version__}"
          + ("; SMOKE sizes (not a measurement)" if a.smoke else ""), flush=True)
    configs = [("pretrain", roi, a.batch) for roi in a.sizes] + [("finetune", roi, a.ft_batch) for roi in a.ft_sizes]
    results = []
    for kind, roi, batch in configs:
        flops = None
        for attention in a.attention:
            b = batch
            while b >= 1:
                try:
                    if flops is None and a.flops:
                        # smoke: count on our attention (MONAI's keeps ~1 GiB per crop on CPU); it recomputes q k^T
                        flops = model_flops(kind, a.feature_size, roi, b, a.sw, device,
                                            "efficient" if a.smoke else "monai")
                    res = measure(kind, a.feature_size, roi, b, a.sw, attention, a.steps, device, flops)
                    break
                except torch.OutOfMemoryError:
                    print(f"{kind} {roi}^3 batch {b} ({attention}): out of memory, retrying at batch {b // 2}",
                          flush=True)
                    res = {"kind": kind, "roi": roi, "batch": b, "attention": attention, "oom": True}
                    flops = None
                    b //= 2
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            res["mfu"] = (res["achieved_tflops"] * 1000 / peak) if peak and res.get("achieved_tflops") else None
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k not in ("losses", "step_s_all")}), flush=True)
    mem = "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB"
    print(f"\n| step | F | ROI | batch | crops/step | attention | steps/s | crops/s | {mem} | model GFLOP/step | "
          "TFLOP/s | MFU | warm-up s | losses finite |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if r.get("oom"):
            print(f"| {r['kind']} | {a.feature_size} | {r['roi']} | {r['batch']} | | {r['attention']} | OOM | | | | | "
                  "| | |")
            continue
        m = r.get("peak_gpu_gib", r.get("peak_rss_gib"))
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        print(f"| {r['kind']} | {r['feature_size']} | {r['roi']} | {r['batch']} | {r['crops_per_step']} | "
              f"{r['attention']} | {r['steps_per_s']:.3f} | {r['crops_per_s']:.2f} | {m:.2f} | "
              f"{r.get('model_gflop_per_step', float('nan')):.0f} | {r.get('achieved_tflops', float('nan')):.2f} | "
              f"{mfu} | {r['warmup_s']:.1f} | {r['finite']} |")
    return results


# ------------------------------------------------------------------------------------------------ pipeline
def _voco(args: list[str], log: Path, timeout: int, env: dict[str, str]) -> tuple[int, float]:
    """Run the real ``voco`` CLI (this interpreter's), output to ``log``; (exit code, seconds)."""
    exe = Path(sys.executable).parent / "voco"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "voco.cli"]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd + args, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\nTIMEOUT after {timeout} s\n")
            rc = 124
    return rc, time.perf_counter() - t0


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run_pipeline(a: argparse.Namespace) -> list[dict[str, Any]]:
    import yaml

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VOCO_ROOT=str(REPO))
    gpus = 0
    if not a.cpu:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if a.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    model = {"name": "cnn_small", "feature_size": 4} if a.smoke else {"name": "swinunetr", "size": "B"}
    roi_pre, roi_ft = (16, 16) if a.smoke else (64, 96)
    override = {
        "preprocess": {"roi": [roi_ft] * 3},  # volumes padded to at least the fine-tuning crop
        "model": model,
        "pretrain": {"batch_size": a.pipeline_batch, "warmup": 1, "checkpoint_every": 1000, "log_every": 1,
                     "num_workers": 0 if a.smoke else 2, "amp": "auto",
                     "voco": {"roi": roi_pre, **({"hidden_dim": 32, "out_dim": 32} if a.smoke else {})}},
        "finetune": {"roi": [roi_ft] * 3, "batch_size": 1, "samples_per_volume": 2, "warmup_steps": 1,
                     "log_every": 1},
    }
    ov = work / "override.yaml"
    ov.write_text(yaml.safe_dump(override))
    print(f"pipeline in {work}: {gpus} GPU(s) visible, model {model}, pre-training {roi_pre}^3, fine-tuning "
          f"{roi_ft}^3, {a.pipeline_steps} steps each" + ("; SMOKE" if a.smoke else ""), flush=True)
    runs: list[dict[str, Any]] = []
    raw, prep = work / "raw", work / "prep"
    steps = str(a.pipeline_steps)
    plan: list[tuple[str, list[str]]] = [
        ("synth", ["synth", "--dataset", "phantom_organs", "--out", str(raw), "--n-cases", str(a.cases)]),
        ("preprocess", ["preprocess", "--dataset-json", str(raw / "dataset.json"), "--out", str(prep),
                        "--dataset", "phantom_organs", "--override", str(ov)]),
        ("pretrain", ["pretrain", "--method", "voco", "--prep", str(prep), "--out", str(work / "ssl"),
                      "--steps", steps, "--override", str(ov)]),
        ("finetune", ["finetune", "--dataset", "phantom_organs", "--init", "file", "--init-path",
                      str(work / "ssl" / "backbone.pt"), "--prep", str(prep), "--out", str(work / "ft"),
                      "--steps", steps, "--override", str(ov)]),
    ]
    if gpus >= 2 or (a.smoke and a.ddp_smoke):
        plan.append(("pretrain-ddp", ["pretrain", "--method", "voco", "--prep", str(prep), "--out",
                                      str(work / "ssl-ddp"), "--steps", steps, "--nproc", "2",
                                      "--override", str(ov)]))
    else:
        print("pretrain-ddp: skipped (fewer than 2 GPUs visible)", flush=True)
    for name, args in plan:
        log = work / f"{name}.log"
        rc, secs = _voco(args, log, a.timeout, env)
        text = log.read_text(errors="replace")
        rec: dict[str, Any] = {"run": name, "exit": rc, "seconds": round(secs, 1), "log": str(log)}
        out = {"pretrain": work / "ssl", "finetune": work / "ft", "pretrain-ddp": work / "ssl-ddp"}.get(name)
        if out is not None:
            recs = _metrics(out)
            rec["steps_logged"] = len(recs)
            rec["losses_finite"] = bool(recs) and all(math.isfinite(float(r["total"])) for r in recs if "total" in r)
            speeds = [r["crops_per_s"] for r in recs[1:] if "crops_per_s" in r]
            rec["crops_per_s"] = round(sorted(speeds)[len(speeds) // 2], 3) if speeds else None
            steps_s = [r["step_s"] for r in recs[1:] if "step_s" in r]
            rec["steps_per_s"] = round(1.0 / sorted(steps_s)[len(steps_s) // 2], 3) if steps_s else None
            rec["cuda_in_log"] = "cuda" in text
            rec["ok"] = rc == 0 and rec["steps_logged"] >= 1 and rec["losses_finite"] and (
                rec["cuda_in_log"] or gpus == 0)
        else:
            rec["ok"] = rc == 0
        runs.append(rec)
        print(json.dumps(rec), flush=True)
        if rc != 0:
            print(text[-3000:], flush=True)
            if name in ("synth", "preprocess", "pretrain"):
                break  # the later runs need this one's output
    print("\n| run | exit | seconds | steps logged | steps/s | crops/s | losses finite | CUDA in log | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        cells = [r["run"], r["exit"], r["seconds"], *(r.get(k, "") for k in ("steps_logged", "steps_per_s",
                                                                              "crops_per_s", "losses_finite",
                                                                              "cuda_in_log")), r["ok"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("throughput", "pipeline", "all"))
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device: the code paths run, no measurement")
    p.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is available")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="pre-training ROIs (default 64 96)")
    p.add_argument("--ft-sizes", type=int, nargs="*", default=None, help="fine-tuning ROIs (default 96)")
    p.add_argument("--feature-size", type=int, default=None, help="SwinUNETR F (default 48 = SwinUNETR-B)")
    p.add_argument("--batch", type=int, default=None,
                   help="pre-training volumes per step (sw + 9 crops each; default 4)")
    p.add_argument("--ft-batch", type=int, default=None, help="crops per fine-tuning step (default 4)")
    p.add_argument("--sw", type=int, default=2, help="random crops per volume")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5)")
    p.add_argument("--attention", nargs="+", default=["efficient", "monai"], choices=("efficient", "monai"))
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count (and MFU)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--work", default=None, help="pipeline work folder (default: a new temporary folder)")
    p.add_argument("--cases", type=int, default=4, help="phantom volumes for the pipeline")
    p.add_argument("--pipeline-steps", type=int, default=None, help="steps per pipeline run (default 4)")
    p.add_argument("--pipeline-batch", type=int, default=2, help="volumes per pre-training step in the pipeline")
    p.add_argument("--ddp-smoke", action="store_true", help="with --smoke: also the 2-process run (gloo on CPU)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pipeline command")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    import voco  # noqa: F401 - first, as the voco CLI: voco.runtime's settings precede torch's import

    smoke = {"sizes": [64], "ft_sizes": [64], "feature_size": 12, "batch": 1, "ft_batch": 1, "steps": 1,
             "pipeline_steps": 2}
    full = {"sizes": [64, 96], "ft_sizes": [96], "feature_size": 48, "batch": 4, "ft_batch": 4, "steps": 5,
            "pipeline_steps": 4}
    for k, v in (smoke if a.smoke else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.smoke:
        a.attention = a.attention[:1] if a.attention == ["efficient", "monai"] else a.attention
    if a.work is None:
        import tempfile

        a.work = tempfile.mkdtemp(prefix="voco-gpu-check-")
    results: dict[str, Any] = {}
    ok = True
    if a.part in ("throughput", "all"):
        results["throughput"] = run_throughput(a)
        ok &= all(r.get("finite", False) or r.get("oom") for r in results["throughput"])
    if a.part in ("pipeline", "all"):
        results["pipeline"] = run_pipeline(a)
        ok &= all(r["ok"] for r in results["pipeline"])
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ngpu_check: {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
