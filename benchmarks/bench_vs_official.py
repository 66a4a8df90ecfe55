"""VoCo pre-training step: ours vs the official implementation, same model, crops and threads, one run.

DESIGN "Targets": our VoCo step should take <= 0.8x the official step's time at <= its peak memory.

The official implementation (Luffy03/Large-Scale-Medical, folder ``Self-supervised/``; Luffy03/VoCo has the same
layout) is NOT part of this repository: bring its files to a folder outside the repository yourself and point the
benchmark at it with ``--official PATH`` or ``VOCO_OFFICIAL_DIR`` (the repository root or its ``Self-supervised``
folder). Its modules are imported at run time (``models.voco_head.VoCoHead``, ``optimizers.lr_scheduler``,
``utils.voco_trans``); nothing of it is copied here. Import names it needs that are not installed (today only
``dynamic_network_architectures``, used by a model class the VoCo head does not touch) are stubbed inside the
official subprocess, and the stubs raise if anything calls them. Without the official code the benchmark measures
ours only and says so.

What is timed, per implementation, each in its own subprocess (so ``ru_maxrss`` is its own peak):

* official: ``loss = VoCoHead(img, crops, labels)`` (backbone on all crops, feature dropout, student projector, EMA of
  the teacher projector, teacher projector, VoCo loss) -> ``backward`` -> AdamW(amsgrad) step -> warm-up cosine
  scheduler step -> ``zero_grad``, as in its ``voco_train.py`` on CPU without AMP.
* ours: ``make_step`` of ``voco.train.pretrain_ssl`` (the same work plus the logged pretext accuracy) -> ``backward``
  -> grad-norm -> AdamW(amsgrad) step -> scheduler step -> EMA teacher update -> scalar logging, as the shared loop
  (``voco.train.loop.train``) does per step, without its checkpoint / metrics-file bookkeeping.

Both get the same tensors: B volumes x (sw random + 9 base) crops of roi^3 made once by our view sampler from a
synthetic volume. Model: MONAI SwinUNETR encoder (v2 blocks, window 7, depths 2-2-2-2) at feature size F; the official
``VoCoHead`` sizes its projector input only for F in (48, 96, 192), so for other F its student and teacher heads are
rebuilt with its own ``projection_head`` class at the 24F input our embedding has. Gradient checkpointing is the same
on both sides (``--checkpoint``; our config default is off, the official training script's default is on).

Also measured (roi 64 only, the size the official sampler hard-codes): time to sample one volume's views with the
official ``VoCoAugmentation`` (MONAI dictionary transforms) vs ours (``sample_voco_views``).

Runs: ``--repeats`` rounds (default 3), each running every side once in alternation (ours, official, ours, ...), so
that a change of machine load hits both; the summary gives per-side medians over the rounds and the median of the
per-round ratios ours/official. Our side runs as the ``voco`` CLI does: ``import voco`` first (OpenMP waits passively)
and the training loop's malloc settings (``voco.runtime``); the official side runs as its users run it, or with our
OpenMP setting too (``--official-runtime passive|both``: OpenMP workers wait passively, which is most of what our
runtime settings do on a busy machine; our malloc settings would nearly double its peak, so it does not get them).

Variants of our step (``--variants``, measured in the first round only, each with its numerical difference from our
fp32 eager step on the same initial weights, crops and dropout draws - loss, the gradient of every trained tensor,
the embedding): ``bf16`` (CPU autocast), ``compile`` (``torch.compile`` of the backbone; its compile time is
reported), ``monai-attention`` (``model.window_attention: monai``), ``no-runtime`` (``VOCO_CPU_RUNTIME=0``).

    python benchmarks/bench_vs_official.py --official /tmp/official_voco            # F 12, 64^3, 1 volume, sw 2
    python benchmarks/bench_vs_official.py --feature-size 48 --repeats 3 --json out.json
    python benchmarks/bench_vs_official.py --variants bf16,compile,monai-attention,no-runtime --repeats 1
    VOCO_OFFICIAL_DIR=/tmp/official_voco python benchmarks/bench_vs_official.py --checkpoint on

A round is 1 warm-up + 2 timed steps of 11 crops per side: at F = 12 on the shared 2-core machine, about 1-3 minutes
for ours and 2-5 for the official side, depending on the load. ``--ours-env KEY=VALUE`` measures a candidate fix on
our side only (the header says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SSL_DIR = "Self-supervised"
# import names the official Self-supervised code imports but the VoCo head never uses (PlainConvUNet_load.py)
STUB_MODULES = {
    "dynamic_network_architectures": [],
    "dynamic_network_architectures.architectures": [],
    "dynamic_network_architectures.architectures.unet": ["ResidualEncoderUNet", "PlainConvUNet"],
    "dynamic_network_architectures.building_blocks": [],
    "dynamic_network_architectures.building_blocks.helper": ["get_matching_instancenorm", "convert_dim_to_conv_op"],
}


# ------------------------------------------------------------------------------------------------------ helpers
def find_official(path: str | None) -> Path | None:
    """The official ``Self-supervised`` folder under ``path`` (repo root or the folder itself), or None."""
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    for cand in (p, p / SSL_DIR):
        if (cand / "models" / "voco_head.py").is_file():
            return cand
    return None


def stub_missing_imports() -> list[str]:
    """Install placeholder modules for the official code's unused, uninstalled imports; return their names."""
    import importlib.util

    stubbed: list[str] = []
    installed = {r: importlib.util.find_spec(r) is not None for r in {n.split(".")[0] for n in STUB_MODULES}}
    for name, attrs in STUB_MODULES.items():
        if installed[name.split(".")[0]] or name in sys.modules:
            continue  # really installed: use it
        mod = types.ModuleType(name)

        def _missing(*_a: Any, _n: str = name, **_k: Any) -> Any:
            raise RuntimeError(f"{_n} is a benchmark stub (not installed); the VoCo head should not call it")

        for a in attrs:
            setattr(mod, a, _missing)
        mod.__path__ = []  # type: ignore[attr-defined]  # a package, so submodules resolve
        sys.modules[name] = mod
        stubbed.append(name)
    return stubbed


def rss_gib() -> float:
    """Current resident set size (GiB) from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def usage() -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def make_inputs(path: Path, roi: int, sw: int, batch: int, seed: int) -> dict[str, Any]:
    """One step's views (our sampler, SPEC 2 augmentation) of ``batch`` synthetic volumes, saved to ``path``."""
    import numpy as np
    import torch

    from voco.ssl.crops import collate_views, sample_voco_views

    rng = np.random.default_rng(seed)
    views = []
    for _ in range(batch):
        vol = rng.random((3 * roi + 8, 3 * roi + 8, roi + 4), dtype=np.float32)
        views.append(sample_voco_views(vol, 3, roi, sw, rng, "voco"))
    b = collate_views(views)
    b = {k: v.contiguous() for k, v in b.items()}
    torch.save(b, path)
    return {k: list(v.shape) for k, v in b.items()}


def time_views(impl: str, roi: int, sw: int, n: int, official: Path | None) -> float | None:
    """Median seconds to sample one volume's VoCo views (sw random + 9 base crops, augmented); roi 64 only."""
    if roi != 64:
        return None
    import numpy as np

    rng = np.random.default_rng(1)
    vols = [rng.random((3 * roi, 3 * roi, roi), dtype=np.float32) for _ in range(n)]
    times = []
    if impl == "ours":
        from voco.ssl.crops import sample_voco_views

        for v in vols:
            t0 = time.perf_counter()
            sample_voco_views(v, 3, roi, sw, rng, "voco")
            times.append(time.perf_counter() - t0)
    else:
        # official utils/voco_trans.py, loaded as a file: its package __init__ builds dataset lists at import time
        import importlib.util

        spec = importlib.util.spec_from_file_location("official_voco_trans", official / "utils" / "voco_trans.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        aug = mod.VoCoAugmentation(argparse.Namespace(sw_batch_size=sw), aug=True)
        for v in vols:
            t0 = time.perf_counter()
            aug({"image": v[None]})
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


# -------------------------------------------------------------------------------------------- one implementation
def build_official(args: argparse.Namespace, official: Path, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch
    from models.voco_head import VoCoHead, projection_head  # official
    from monai.data import MetaTensor
    from optimizers.lr_scheduler import WarmupCosineSchedule  # official

    ns = argparse.Namespace(
        in_channels=1,
        feature_size=args.feature_size,
        dropout_path_rate=0.0,
        use_checkpoint=args.checkpoint == "on",
        spatial_dims=3,
    )
    model = VoCoHead(ns)
    info: dict[str, Any] = {"head_rebuilt": False}
    embed_dim = 24 * args.feature_size
    if model.student.layer1[0].in_features != embed_dim:
        # its head sizes the input only for F in (48, 96, 192); rebuild with its own class at the real width
        model.student = projection_head(in_dim=embed_dim, hidden_dim=1024, out_dim=1024)
        model.teacher = projection_head(in_dim=embed_dim, hidden_dim=1024, out_dim=1024)
        info["head_rebuilt"] = True
    model.train()
    opt = torch.optim.AdamW(params=model.parameters(), lr=1e-4, amsgrad=True)  # voco_train.py: adamw, amsgrad
    sched = WarmupCosineSchedule(opt, warmup_steps=5000, t_total=100000)
    img, crops = MetaTensor(batch["rand"]), MetaTensor(batch["base"])
    labels = batch["labels"].double()  # its loader yields numpy float64 labels
    info["encoder_params"] = sum(p.numel() for p in model.backbone.parameters())
    info["trainable_params"] = sum(p.numel() for p in model.backbone.parameters()) + sum(
        p.numel() for p in model.student.parameters()
    )

    def one() -> float:
        loss = model(img, crops, labels)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        return float(loss.item())

    return one, info


VARIANTS = ("fp32", "bf16", "compile", "monai-attention", "no-runtime")
# environment of the official side with our OpenMP setting (voco.runtime's ENV_DEFAULTS). Our malloc settings are not
# given to it: with MONAI's attention matrices they nearly double its peak (2.4 -> 4.5 GiB on a 2-crop probe)
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def build_ours(args: argparse.Namespace, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import contextlib

    import torch

    from voco import runtime
    from voco.models.factory import decoder_parameter_names
    from voco.train.loop import LoopConfig, lr_lambda
    from voco.train.pretrain_ssl import VOCO_DEFAULTS, build_ssl, make_step

    variant = args.variant
    runtime.configure_malloc()  # as voco.train.loop.train does on CPU (a no-op under VOCO_CPU_RUNTIME=0)
    ssl = dict(VOCO_DEFAULTS["voco"])
    ssl.update({"roi": args.roi, "sw": args.sw})
    cfg = {
        "model": {
            "name": "swinunetr",
            "size": "B",
            "feature_size": args.feature_size,
            "use_checkpoint": args.checkpoint == "on",
            "window_attention": "monai" if variant == "monai-attention" else "efficient",
        }
    }
    student, teacher = build_ssl(cfg, "voco", ssl)
    student.train()
    info: dict[str, Any] = {"variant": variant, "runtime": runtime.applied()}
    if variant == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # same dropout draws as eager (numerical comparison)
        student.backbone.embed = torch.compile(student.backbone.embed)
    step = make_step("voco", teacher, ssl)
    lcfg = LoopConfig(steps=100000, lr=1e-4, warmup=5000)
    params = [p for p in student.parameters() if p.requires_grad]
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lcfg.lr, weight_decay=lcfg.weight_decay, amsgrad=lcfg.amsgrad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(lcfg.warmup, lcfg.steps, lcfg.schedule))
    dec = set(decoder_parameter_names(student.backbone))
    info.update({
        "encoder_params": sum(p.numel() for n, p in student.backbone.named_parameters() if n not in dec),
        "trainable_params": sum(p.numel() for p in params),
        "decoder_params_frozen": sum(p.numel() for n, p in student.backbone.named_parameters() if n in dec),
    })
    captured: dict[str, Any] = {}
    student.projector.register_forward_pre_hook(lambda _m, a: captured.__setitem__("embedding", a[0].detach()))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant == "bf16" else contextlib.nullcontext
    calls = {"n": 0}

    def one() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = step(student, batch)
        out["total"].backward()
        if calls["n"] == 0 and args.numerics:  # the first step: what the fp32 reference is compared with
            torch.save(
                {
                    "losses": {k: float(v.detach().float()) for k, v in out.items() if v.numel() == 1},
                    "embedding": captured["embedding"].float().clone(),
                    "grads": {n: p.grad.detach().float().clone() for n, p in zip(names, params, strict=True)
                              if p.grad is not None},
                },
                args.numerics,
            )
        calls["n"] += 1
        gn = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        if torch.isfinite(gn):
            opt.step()
        sched.step()
        teacher.update(student.projector)
        vals = {k: float(v.detach().float().item()) for k, v in out.items() if v.numel() == 1}
        return vals["total"]

    return one, info


def compare_numerics(path: str, ref_path: str) -> dict[str, Any]:
    """Differences of one variant's first step from the fp32 eager reference (same weights, crops, dropout), in fp64.

    The worst tensor is taken among those whose reference gradient is not negligible (norm >= 1e-6 of the whole
    gradient's): e.g. the bias of a linear layer followed by batch normalisation has a true gradient of 0, and its
    relative error is noise over noise.
    """
    import torch

    got, ref = torch.load(path, weights_only=True), torch.load(ref_path, weights_only=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))

    common = [n for n in ref["grads"] if n in got["grads"]]
    g = torch.cat([got["grads"][n].double().flatten() for n in common])
    r = torch.cat([ref["grads"][n].double().flatten() for n in common])
    total = float(r.norm())
    relevant = [n for n in common if float(ref["grads"][n].double().norm()) >= 1e-6 * total]
    worst = max(relevant, key=lambda n: rel(got["grads"][n], ref["grads"][n]))
    per_tensor = sorted(rel(got["grads"][n], ref["grads"][n]) for n in relevant)
    return {
        "loss_ref": ref["losses"]["total"],
        "loss_abs_diff": abs(got["losses"]["total"] - ref["losses"]["total"]),
        "embedding_rel_l2": rel(got["embedding"], ref["embedding"]),
        "embedding_max_abs": float((got["embedding"].double() - ref["embedding"].double()).abs().max()),
        "grad_rel_l2": rel(g, r),
        "grad_cosine": float(torch.dot(g, r) / (g.norm() * r.norm()).clamp_min(1e-300)),
        "grad_median_tensor_rel_l2": per_tensor[len(per_tensor) // 2],
        "grad_worst_tensor": worst,
        "grad_worst_rel_l2": rel(got["grads"][worst], ref["grads"][worst]),
        "grad_tensors_compared": len(relevant),
        "grad_tensors_negligible": len(common) - len(relevant),
    }


def run_one(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark one implementation in this process (called in a subprocess)."""
    if impl == "ours":
        import voco  # noqa: F401 - first, as the voco CLI does: voco.runtime's settings precede torch's import

    import numpy as np
    import torch

    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    official = find_official(args.official) if impl == "official" else None
    stubbed: list[str] = []
    if impl == "official":
        if official is None:
            raise SystemExit(f"official code not found under {args.official}")
        sys.path.insert(0, str(official))
        stubbed = stub_missing_imports()
    batch = torch.load(args.inputs, weights_only=True)
    rss_inputs = rss_gib()
    view_s = None
    if args.view_samples:
        try:
            view_s = time_views(impl, args.roi, args.sw, args.view_samples, official)
        except Exception as e:  # noqa: BLE001 - a side measurement; the step timing goes on
            print(f"{impl}: view-sampling timing failed: {e!r}", file=sys.stderr)
    one, info = build_official(args, official, batch) if impl == "official" else build_ours(args, batch)
    rss_model = rss_gib()
    n_crops = int(batch["rand"].shape[0] + batch["base"].shape[0])

    warm, losses = [], []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(one())
        warm.append(time.perf_counter() - t0)
    times, cpus, syss, faults = [], [], [], []
    for _ in range(args.steps):
        t0, (u0, s0, f0) = time.perf_counter(), usage()
        losses.append(one())
        times.append(time.perf_counter() - t0)
        u1, s1, f1 = usage()
        cpus.append(u1 - u0 + s1 - s0)
        syss.append(s1 - s0)
        faults.append(f1 - f0)
    step_s = float(np.median(times))
    return {
        "impl": impl,
        "variant": getattr(args, "variant", None) if impl == "ours" else None,
        "feature_size": args.feature_size,
        "roi": args.roi,
        "volumes": int(batch["labels"].shape[0]),
        "sw": int(batch["labels"].shape[1]),
        "crops_per_step": n_crops,
        "threads": torch.get_num_threads(),
        "checkpoint": args.checkpoint,
        "warmup_s": warm,
        "step_s_all": times,
        "step_s": step_s,
        "cpu_s_per_step": float(np.median(cpus)),
        "sys_s_per_step": float(np.median(syss)),
        "minor_faults_per_step": int(np.median(faults)),
        "crops_per_s": n_crops / step_s,
        "losses": losses,
        "rss_after_inputs_gib": rss_inputs,
        "rss_after_build_gib": rss_model,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "view_sample_s": view_s,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "stubbed_imports": stubbed,
        "official_dir": str(official) if official else None,
        "torch": torch.__version__,
        **info,
    }


# --------------------------------------------------------------------------------------------------------- main
def child_cmd(impl: str, a: argparse.Namespace, inputs: Path, variant: str = "fp32", view_samples: int = 0,
              numerics: Path | None = None) -> list[str]:
    cmd = [sys.executable, __file__, "--one", impl, "--inputs", str(inputs)]
    cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    cmd += ["--feature-size", str(a.feature_size), "--roi", str(a.roi), "--sw", str(a.sw)]
    cmd += ["--checkpoint", a.checkpoint, "--view-samples", str(view_samples), "--variant", variant]
    if numerics is not None:
        cmd += ["--numerics", str(numerics)]
    if a.official:
        cmd += ["--official", str(a.official)]
    return cmd


def ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}" if x is not None and y else "n/a"


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def side_label(impl: str, variant: str) -> str:
    return impl if variant in ("fp32", "default") else f"{impl} [{variant}]"


def plan_round(r: int, a: argparse.Namespace, impls: list[str]) -> list[tuple[str, str]]:
    """(impl, variant) in the order of round ``r``: ours and the official side alternate who goes first."""
    heads: list[tuple[str, str]] = []
    if "ours" in impls:
        heads.append(("ours", "fp32"))
    if "official" in impls:
        heads += [("official", v) for v in (("default", "passive") if a.official_runtime == "both"
                                            else ("passive",) if a.official_runtime == "passive" else ("default",))]
    if r % 2 == 1:
        heads = heads[::-1]
    tail = [("ours", v) for v in a.variants] if r == 0 and "ours" in impls else []
    return heads + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", default=os.environ.get("VOCO_OFFICIAL_DIR"), help="official code folder")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side and round (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps first")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every side once, in alternating order")
    p.add_argument("--feature-size", type=int, default=12, help="SwinUNETR feature size F (48 = Swin-B)")
    p.add_argument("--roi", type=int, default=64, help="crop side (multiple of 32)")
    p.add_argument("--sw", type=int, default=2, help="random crops per volume")
    p.add_argument("--volumes", type=int, default=1, help="volumes per step (each sw + 9 crops)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--checkpoint", choices=("off", "on"), default="off", help="gradient checkpointing (both sides)")
    p.add_argument("--view-samples", type=int, default=5, help="volumes for the view-sampling timing (0 = skip)")
    p.add_argument("--only", choices=("ours", "official"), default=None, help="run one side only")
    p.add_argument("--official-runtime", choices=("default", "passive", "both"), default="default",
                   help="official side as its users run it (default), with passive OpenMP waiting as ours, or both")
    p.add_argument("--variants", default="",
                   help=f"extra variants of our step (round 1), comma-separated: {', '.join(VARIANTS[1:])}")
    p.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for our side only (to measure a candidate fix, e.g. THP_MEM_ALLOC_ENABLE=1)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--numerics", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if any("=" not in kv for kv in a.ours_env):
        p.error("--ours-env takes KEY=VALUE")
    if a.roi % 32:
        p.error(f"--roi must be a multiple of 32 (SwinUNETR), got {a.roi}")
    a.variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in a.variants if v not in VARIANTS[1:]]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS[1:])}")
    if a.repeats < 1 or a.steps < 1:
        p.error("--repeats and --steps must be >= 1")
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a)), flush=True)
        return 0

    sys.path.insert(0, str(REPO / "src"))
    official = find_official(a.official)
    impls = ["ours", "official"] if a.only is None else [a.only]
    if official is None and "official" in impls:
        why = (
            "no --official / VOCO_OFFICIAL_DIR given"
            if not a.official
            else f"no {SSL_DIR}/models/voco_head.py in {a.official}"
        )
        print(
            f"official implementation not found ({why}): "
            f"{'measuring ours only' if 'ours' in impls else 'nothing to measure'}. Bring Luffy03/Large-Scale-Medical's "
            f"{SSL_DIR}/ to a folder outside this repository and pass --official PATH.",
            file=sys.stderr,
        )
        impls.remove("official")
        if not impls:
            return 1
    load0 = os.getloadavg()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    for k in ("VOCO_CPU_RUNTIME", "OMP_WAIT_POLICY", "GLIBC_TUNABLES", *[k for k in env if k.startswith("MALLOC_")]):
        env.pop(k, None)  # each side gets exactly the runtime it is meant to have
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="voco-bench-") as tmp:
        inputs = Path(tmp) / "views.pt"
        shapes = make_inputs(inputs, a.roi, a.sw, a.volumes, seed=0)
        print(f"inputs: {shapes}", file=sys.stderr)
        ref_numerics = Path(tmp) / "numerics-fp32.pt"
        for r in range(a.repeats):
            for impl, variant in plan_round(r, a, impls):
                t0 = time.perf_counter()
                if impl == "ours":
                    env_i = dict(env, **dict(kv.split("=", 1) for kv in a.ours_env))
                    if variant == "no-runtime":
                        env_i["VOCO_CPU_RUNTIME"] = "0"
                    numerics = (ref_numerics if variant == "fp32" else Path(tmp) / f"numerics-{variant}.pt") \
                        if r == 0 and a.variants else None
                else:
                    env_i = dict(env, **PASSIVE_ENV) if variant == "passive" else env
                    numerics = None
                views = a.view_samples if r == 0 and variant in ("fp32", "default") else 0
                cmd = child_cmd(impl, a, inputs, variant if impl == "ours" else "fp32", views, numerics)
                done = subprocess.run(cmd, capture_output=True, text=True, env=env_i, cwd=tmp)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                label = side_label(impl, variant)
                if done.returncode != 0 or line is None:
                    print(f"round {r + 1} {label}: failed (exit {done.returncode})\n{done.stderr[-3000:]}",
                          file=sys.stderr)
                    failed.append(f"round {r + 1} {label}")
                    continue
                res = json.loads(line[len("RESULT ") :])
                res.update(round=r + 1, side=label, official_runtime=variant if impl == "official" else None,
                           subprocess_wall_s=time.perf_counter() - t0)
                if numerics is not None and variant != "fp32" and ref_numerics.is_file():
                    res["numerics"] = compare_numerics(str(numerics), str(ref_numerics))
                runs.append(res)
                print(
                    f"round {r + 1} {label}: {res['step_s']:.2f} s/step, CPU {res['cpu_s_per_step']:.1f} s/step, "
                    f"peak RSS {res['peak_rss_gib']:.2f} GiB, load {res['load_start'][0]:.1f}",
                    file=sys.stderr,
                )
    load1 = os.getloadavg()
    if not runs:
        return 1
    report(a, runs, load0, load1, time.perf_counter() - t_all)
    if a.json:
        Path(a.json).write_text(
            json.dumps({"args": {k: v for k, v in vars(a).items() if k not in ("one", "inputs", "numerics")},
                        "load_before": load0, "load_after": load1, "runs": runs, "failed": failed}, indent=2) + "\n"
        )
    return 0 if not failed else 1


def report(a: argparse.Namespace, runs: list[dict[str, Any]], load0, load1, total_s: float) -> None:
    """Print the per-run table, per-side medians, ratios ours/official and the variants' numerics (Markdown)."""
    import torch

    first = runs[0]
    print(
        f"\nVoCo pre-training step, ours vs official - {cpu_name()}, torch {torch.__version__}, {a.threads} threads, "
        f"SwinUNETR F={a.feature_size}, {a.roi}^3 crops, {first['volumes']} volume(s) x (sw {first['sw']} + 9) = "
        f"{first['crops_per_step']} crops/step, gradient checkpointing {a.checkpoint}, {a.repeats} round(s) of "
        f"{a.warmup} warm-up + {a.steps} timed steps per side (alternating order)"
        + (f"; OUR SIDE with {' '.join(a.ours_env)}" if a.ours_env else "")
    )
    print(
        f"load average (1/5/15 min) before: {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"after: {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}; total {total_s:.0f} s\n"
    )
    print("| round | side | s/step | steps (s) | CPU s/step (system) | page faults/step | crops/s | peak RSS GiB | "
          "RSS after build GiB | load 1 min start/end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(
            f"| {r['round']} | {r['side']} | {r['step_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['step_s_all'])} | "
            f"{r['cpu_s_per_step']:.1f} ({r['sys_s_per_step']:.1f}) | {r['minor_faults_per_step']:,} | "
            f"{r['crops_per_s']:.3f} | {r['peak_rss_gib']:.2f} | {r['rss_after_build_gib']:.2f} | "
            f"{r['load_start'][0]:.2f}/{r['load_end'][0]:.2f} |"
        )
    sides: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        sides.setdefault(r["side"], []).append(r)
    keys = ("step_s", "cpu_s_per_step", "sys_s_per_step", "minor_faults_per_step", "peak_rss_gib")
    med = {s: {k: median([r[k] for r in rs]) for k in keys} for s, rs in sides.items()}
    print("\nMedians over rounds:\n")
    print("| side | rounds | s/step | CPU s/step | system s/step | page faults/step | peak RSS GiB | "
          "view sampling s/volume | trainable params |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, rs in sides.items():
        m = med[s]
        vs = next((r["view_sample_s"] for r in rs if r.get("view_sample_s") is not None), None)
        print(f"| {s} | {len(rs)} | {m['step_s']:.2f} | {m['cpu_s_per_step']:.1f} | {m['sys_s_per_step']:.2f} | "
              f"{m['minor_faults_per_step']:,.0f} | {m['peak_rss_gib']:.2f} | "
              f"{f'{vs:.3f}' if vs is not None else 'n/a'} | {rs[0]['trainable_params']:,} |")
    ours = {r["round"]: r for r in sides.get("ours", [])}
    for off_side in ("official", "official [passive]"):
        off = {r["round"]: r for r in sides.get(off_side, [])}
        paired = [(ours[k], off[k]) for k in sorted(ours.keys() & off.keys())]
        if not paired:
            continue
        cpu_r = [o["cpu_s_per_step"] / f["cpu_s_per_step"] for o, f in paired]
        wall_r = [o["step_s"] / f["step_s"] for o, f in paired]
        rss_r = [o["peak_rss_gib"] / f["peak_rss_gib"] for o, f in paired]
        c, w, m = median(cpu_r), median(wall_r), median(rss_r)
        what = "as its users run it" if off_side == "official" else "with passive OpenMP waiting, as ours"
        print(
            f"\nours/{off_side} ({what}), median of {len(paired)} paired round(s): CPU time {c:.2f} "
            f"(rounds {', '.join(f'{x:.2f}' for x in cpu_r)}; target <= 0.80: {'met' if c <= 0.8 else 'NOT met'}), "
            f"wall time {w:.2f} ({', '.join(f'{x:.2f}' for x in wall_r)}), "
            f"peak RSS {m:.2f} ({', '.join(f'{x:.2f}' for x in rss_r)}; target <= 0.80: "
            f"{'met' if m <= 0.8 else 'NOT met'})"
        )
        o, f = paired[0]
        if f["encoder_params"] != o["encoder_params"]:
            print(f"WARNING: encoder sizes differ: ours {o['encoder_params']:,}, official {f['encoder_params']:,}")
        vo, vf = med["ours"], med[off_side]
        views = [next((r["view_sample_s"] for r in sides[x] if r.get("view_sample_s")), None)
                 for x in ("ours", off_side)]
        print(f"ratio of the medians: CPU {ratio(vo['cpu_s_per_step'], vf['cpu_s_per_step'])}, "
              f"wall {ratio(vo['step_s'], vf['step_s'])}, peak RSS {ratio(vo['peak_rss_gib'], vf['peak_rss_gib'])}, "
              f"view sampling {ratio(*views)}")
    if sides.get("ours"):
        print(f"\nour runtime settings (voco.runtime): {sides['ours'][0].get('runtime') or 'none'}")
    variants = [r for r in runs if r["impl"] == "ours" and r.get("variant") not in (None, "fp32")]
    if variants:
        ref = next((r for r in sides.get("ours", []) if r["round"] == 1), None)
        print("\nVariants of our step (round 1; numerics: first step vs our fp32 eager step, same weights, crops and "
              "dropout draws):\n")
        print("| variant | s/step | CPU s/step (system) | page faults/step | peak RSS GiB | CPU vs fp32 | warm-up s | "
              "loss abs. diff | embedding rel. L2 | gradient rel. L2 | gradient cosine | median tensor rel. L2 | "
              "worst tensor (rel. L2) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in variants:
            n = r.get("numerics") or {}
            num = (f"{n['loss_abs_diff']:.2e} | {n['embedding_rel_l2']:.2e} | {n['grad_rel_l2']:.2e} | "
                   f"{n['grad_cosine']:.6f} | {n['grad_median_tensor_rel_l2']:.2e} | "
                   f"{n['grad_worst_tensor']} ({n['grad_worst_rel_l2']:.2e})") if n else " | ".join(["n/a"] * 6)
            print(f"| {r['variant']} | {r['step_s']:.2f} | {r['cpu_s_per_step']:.1f} ({r['sys_s_per_step']:.1f}) | "
                  f"{r['minor_faults_per_step']:,} | {r['peak_rss_gib']:.2f} | "
                  f"{ratio(r['cpu_s_per_step'], ref['cpu_s_per_step'] if ref else None)} | "
                  f"{', '.join(f'{t:.1f}' for t in r['warmup_s'])} | {num} |")
    notes = []
    off_runs = [r for r in runs if r["impl"] == "official"]
    if off_runs and off_runs[0].get("head_rebuilt"):
        notes.append(f"official projector rebuilt with its projection_head at in_dim {24 * a.feature_size}")
    if off_runs and off_runs[0].get("stubbed_imports"):
        notes.append(f"stubbed (not installed, unused by VoCoHead): {', '.join(off_runs[0]['stubbed_imports'])}")
    notes.append("sides run one after another on a shared machine: compare each round's ratio and the load columns")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())
