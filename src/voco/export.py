"""Share a fine-tuned run: ``voco export --run RUN --format monai-bundle|hf --out DIR``.

``monai-bundle``: a MONAI bundle that MONAI's own bundle API loads and runs (``monai.bundle.ConfigParser``,
``monai.bundle.run("run", config_file=..., meta_file=..., bundle_root=..., dataset_dir=...)``)::

    DIR/configs/metadata.json     version, MONAI / PyTorch versions, task, labels (network_data_format), provenance
    DIR/configs/inference.json    network_def, LoadImaged + the run's pre-processing, sliding-window inferer,
                                  inversion of the class probabilities to the scan's grid, argmax, SaveImaged
    DIR/scripts/voco_transforms.py  the run's pre-processing as one invertible MONAI transform (numpy / scipy /
                                  nibabel / MONAI only: :mod:`voco.bundle_transforms`)
    DIR/models/model.pt           the network's state dict
    DIR/docs/README.md            the model card

The network is plain MONAI where voco's backbone is one (SwinUNETR, BasicUNet, SegResNet: identical parameter
names); ``cnn_small`` (the laptop demo) needs the ``voco`` package. The pre-processing is voco's own (MONAI's
``Spacingd`` sizes the resampled grid differently: ``(n - 1) * s / t + 1`` voxels instead of ``n * s / t``, which
moves the foreground crop and every sliding window), so the bundle's masks equal ``voco predict``'s voxel for voxel.

``hf``: a Hugging Face-style model folder::

    DIR/model.safetensors         the weights (safetensors; loads with safetensors alone)
    DIR/config.json               architecture (+ the MONAI class and arguments), labels, pre-processing, inference
    DIR/README.md                 model card: data, method, metrics from the run's evaluation, how to use it
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from voco.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("monai-bundle", "hf")
META_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def find_summary(run_dir: Path, results_root: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The run's evaluation ``summary.json``: ``<results>/<dataset>/<init>/<method>/nN-sS/`` for a run in
    ``<runs>/finetune/<dataset>/<init>/<method>/nN-sS/`` (None when it was not evaluated)."""
    parts = Path(run_dir).resolve().parts
    if "finetune" not in parts or results_root is None:
        return None
    rel = Path(*parts[len(parts) - 1 - parts[::-1].index("finetune") + 1:])
    p = Path(results_root) / rel / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def network_spec(run: Any) -> dict[str, Any]:
    """``{"_target_": class, **args}`` of the run's network (plain MONAI when possible)."""
    arch = run.record["arch"]
    if arch["task"] != "segmentation":
        raise ConfigError(f"{run.path}: export covers segmentation runs; this run is a {arch['task']} task")
    from voco.models.record import monai_equivalent

    monai = monai_equivalent(arch)
    if monai is not None:
        return {"_target_": monai["target"], **monai["args"]}
    from voco.models.factory import feature_size_for

    f = feature_size_for(arch["name"], arch.get("size", "B"), arch.get("feature_size"))
    if arch["name"] == "cnn_small":
        return {"_target_": "voco.models.small.CnnSmall", "in_channels": int(arch["in_channels"]),
                "out_channels": int(arch["out_channels"]), "feature_size": int(f)}
    raise ConfigError(f"{run.path}: no exportable network for model {arch['name']!r}")


def _versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    from voco import __version__

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__, "voco_version": __version__}


def _preprocessing(pre: dict[str, Any]) -> list[dict[str, Any]]:
    """Load + channel-first, then voco's own pre-processing as one invertible transform (``scripts/``)."""
    modality = [str(m).upper() for m in pre.get("modality", ["CT"])]
    if modality != ["CT"]:
        raise ConfigError(f"the MONAI bundle export covers single-channel CT runs; this run's modalities: {modality}")
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "scripts.voco_transforms.VocoPreprocessd", "keys": "image",
         "spacing": [float(s) for s in pre["spacing"]], "window": [float(w) for w in pre["window"]],
         "roi": [int(r) for r in pre["roi"]], "storage_dtype": str(pre.get("storage_dtype", "float16"))},
    ]


def inference_settings(run: Any, evaluate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sliding-window settings of the export: the ROI the run trained on, overlap / windows per pass / blending of the
    ``evaluate`` config section (as ``voco evaluate`` and ``voco predict`` use them)."""
    ev = dict(evaluate or {})
    return {"roi": [int(r) for r in run.roi], "overlap": float(ev.get("overlap", 0.5)),
            "sw_batch_size": int(ev.get("sw_batch_size", 4)), "blend": str(ev.get("blend", "gaussian"))}


def inference_config(run: Any, inf: dict[str, Any]) -> dict[str, Any]:
    """The bundle's ``configs/inference.json`` (see the module docstring)."""
    pre = run.preprocess
    roi = [int(r) for r in run.roi]
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "input",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))]",
        "network_def": network_spec(run),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(pre)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi,
                    "sw_batch_size": int(inf.get("sw_batch_size", 4)), "overlap": float(inf.get("overlap", 0.5)),
                    "mode": str(inf.get("blend", "gaussian"))},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True, "post_func": "$lambda x: x.float()"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False},
        ]},
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "predict": "$torch.no_grad()(lambda d: @postprocessing(dict(d, pred=@inferer(d['image'][None].to(@device), "
                   "@network)[0])))",
        "initialize": [
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        "run": ["$[@predict(d) for d in @dataset]"],
        "finalize": [],
    }


def _labels_def(run: Any) -> dict[str, str]:
    labels = run.labels
    return {str(k): labels.get(k, str(k)) for k in range(int(run.record["arch"]["out_channels"]))}


def metadata(run: Any, summary: dict[str, Any] | None) -> dict[str, Any]:
    """The bundle's ``configs/metadata.json``."""
    pre, rec = run.preprocess, run.record
    v = _versions()
    roi = [int(r) for r in run.roi]
    return {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by voco {v['voco_version']} from {run.path}"},
        "monai_version": v["monai_version"],
        "pytorch_version": v["pytorch_version"],
        "numpy_version": v["numpy_version"],
        "required_packages_version": {"nibabel": _version("nibabel"),
                                      **({"voco": v["voco_version"]} if network_spec(run)["_target_"].startswith("voco")
                                         else {})},
        "task": f"{rec['dataset']} segmentation ({len(run.labels) - 1} classes)",
        "description": (f"{rec['arch']['name']} fine-tuned on {rec['dataset']} from init {rec['init']} "
                        f"({rec['method']}, {rec.get('steps')} steps, seed {rec.get('seed')}) with voco"),
        "authors": "voco pipeline",
        "copyright": "see the training data's licence",
        "data_source": rec["dataset"],
        "data_type": "nibabel",
        "intended_use": "research only",
        "image_classes": f"CT, HU window {pre.get('window')}, resampled to {pre.get('spacing')} mm RAS",
        "label_classes": json.dumps(_labels_def(run)),
        "pred_classes": json.dumps(_labels_def(run)),
        "eval_metrics": _metrics(summary),
        "voco": {"preprocess": pre, "training": run.meta.get("training")},
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation",
                                 "num_channels": int(rec["arch"]["out_channels"]), "spatial_shape": roi,
                                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": _labels_def(run)}},
        },
    }


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _metrics(summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    m = summary.get("metrics") or {}
    space = (summary.get("primary") or {}).get("space") or "resampled"
    mean = ((m.get(space) or {}).get("mean")) or {}
    return {f"mean_{k}_{space}": v for k, v in mean.items() if isinstance(v, int | float)}


def model_card(run: Any, summary: dict[str, Any] | None, fmt: str, inf: dict[str, Any]) -> str:
    """A Markdown model card: data, method, metrics from the run's evaluation, use."""
    rec, pre = run.record, run.preprocess
    arch = rec["arch"]
    spec = network_spec(run)
    tag = "monai" if not spec["_target_"].startswith("voco") else "voco"
    lines = [
        "---",
        f"library_name: {tag}",
        "tags: [medical-imaging, ct, 3d, segmentation, voco, monai]",
        "pipeline_tag: image-segmentation",
        "---",
        "",
        f"# {rec['dataset']}: {arch['name']} fine-tuned from {rec['init']} ({rec['method']})",
        "",
        "## Data",
        "",
        f"- Dataset: `{rec['dataset']}`; {rec.get('n_train_used')} training cases (N = {rec.get('n_train')}), "
        f"evaluated on {len(rec.get('test_ids') or rec.get('val_ids') or [])} held-out "
        f"{rec.get('eval_split', 'test')} cases.",
        f"- Classes: {', '.join(f'{k} {v}' for k, v in sorted(run.labels.items()))}.",
        f"- Input: {', '.join(pre.get('modality', ['CT']))}; pre-processing (voco version {pre.get('version')}): "
        f"RAS, {pre.get('spacing')} mm, window {pre.get('window')} scaled to [0, 1], foreground crop, "
        f"padded to {pre.get('roi')}.",
        "",
        "## Method",
        "",
        f"- Network: `{spec['_target_']}` ({', '.join(f'{k}={v}' for k, v in spec.items() if k != '_target_')}).",
        f"- Initialisation: `{rec['init']}` (source: `{rec.get('init_source')}`); fine-tuning `{rec['method']}`, "
        f"{rec.get('steps')} steps, ROI {run.roi}, seed {rec.get('seed')}.",
        f"- Inference: sliding window {run.roi}, overlap {inf['overlap']}, {inf['blend']} blending, "
        "class probabilities resampled to the scan's grid, then argmax.",
        "",
        "## Metrics",
        "",
    ]
    if summary:
        primary = summary.get("primary") or {}
        lines.append(f"Primary: {primary.get('name')} ({primary.get('space', '')}) = {primary.get('value')} on "
                     f"{summary.get('n_cases')} {summary.get('split')} cases (overlap {summary.get('overlap')}).")
        lines.append("")
        space = primary.get("space") or "resampled"
        per = (summary.get("metrics") or {}).get(space) or {}
        if per:
            lines += ["| class | Dice | HD95 (mm) | NSD |", "| --- | --- | --- | --- |"]
            for cls, v in per.items():
                lines.append(f"| {cls} | {_fmt(v.get('dice'))} | {_fmt(v.get('hd95'))} | {_fmt(v.get('nsd'))} |")
    else:
        lines.append("Not evaluated (no summary.json found for this run).")
    lines += ["", "## Use", ""]
    if fmt == "hf":
        lines += ["```python", "import json, torch", "from safetensors.torch import load_file",
                  "cfg = json.load(open('config.json'))", "net_cfg = cfg['network']",
                  "module, _, cls = net_cfg['_target_'].rpartition('.')",
                  "net = getattr(__import__(module, fromlist=[cls]), cls)("
                  "**{k: v for k, v in net_cfg.items() if k != '_target_'})",
                  "net.load_state_dict(load_file('model.safetensors'))",
                  "# inputs: pre-process as cfg['preprocess'] says; or `voco predict` with the original run", "```"]
    else:
        lines += ["```python", "from monai.bundle import run  # masks go to ./eval/<scan>_seg.nii.gz",
                  "run('run', config_file='configs/inference.json', meta_file='configs/metadata.json',",
                  "    bundle_root='.', dataset_dir='/path/to/niftis')", "```",
                  "", "(`python -m monai.bundle run ...` with the same arguments needs the `fire` package.)"]
    lines += ["", "Exported by voco; research use only. The training data's licence applies to these weights.", ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) else "n/a"


def export(run_dir: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str],
           results_root: str | os.PathLike[str] | None = None, evaluate: dict[str, Any] | None = None) -> Path:
    """Export a fine-tuned run as a MONAI bundle or a Hugging Face-style folder; returns ``out``.

    ``evaluate``: the config's ``evaluate`` section (sliding-window overlap, windows per pass, blending).
    """
    import torch

    from voco.io import atomic_path, write_json
    from voco.runs import load_run

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run = load_run(run_dir)
    summary = find_summary(run.path, results_root)
    inf = inference_settings(run, evaluate)
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in run.net.state_dict().items()}
    if fmt == "monai-bundle":
        import shutil

        from voco import bundle_transforms

        for sub in ("configs", "models", "docs", "scripts"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        (out / "scripts" / "__init__.py").write_text("")
        shutil.copyfile(bundle_transforms.__file__, out / "scripts" / "voco_transforms.py")
        write_json(out / "configs" / "inference.json", inference_config(run, inf))
        write_json(out / "configs" / "metadata.json", metadata(run, summary))
        with atomic_path(out / "models" / "model.pt") as tmp:
            torch.save(state, tmp)
        with atomic_path(out / "docs" / "README.md") as tmp:
            tmp.write_text(model_card(run, summary, fmt, inf))
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        config = {
            "model_type": "voco-segmentation",
            "network": network_spec(run),
            "architecture": run.meta.get("architecture"),
            "labels": {str(k): v for k, v in sorted(run.labels.items())},
            "preprocess": run.preprocess,
            "inference": inf,
            "training": run.meta.get("training"),
            "metrics": _metrics(summary),
            **_versions(),
        }
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "voco_format": run.meta.get("format", "")})
        write_json(out / "config.json", config)
        with atomic_path(out / "README.md") as tmp:
            tmp.write_text(model_card(run, summary, fmt, inf))
    log.info("exported %s as %s -> %s", run.path, fmt, out)
    return out
