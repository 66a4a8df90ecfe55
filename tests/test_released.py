"""Released VoCo / VoComni / SuPreM checkpoints as fine-tuning inits.

State dicts are built from the official tensor names and shapes (``tests/data/released_checkpoints.json``, derived by
reading the official repositories: see ``tests/data/make_released_keys.py``) and loaded through the same path as a
downloaded file: every encoder tensor must load, and the transfer report must say what was mapped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from voco import inits
from voco.errors import CheckpointError, ConfigError
from voco.eval import plan
from voco.models import build_model, load_pretrained

DATA = Path(__file__).parent / "data" / "released_checkpoints.json"
DOC = json.loads(DATA.read_text())


def released_file(path: Path, layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a checkpoint in the official layout (random values) to ``path``; returns its raw state dict."""
    spec = DOC["layouts"][layout]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in spec["tensors"].items():
        if name.endswith("relative_position_index"):
            state[name] = torch.randint(0, 10, shape, generator=g)
        else:
            state[name] = torch.randn(shape, generator=g)
    torch.save({spec["wrapper"]: state} if spec["wrapper"] else state, path)
    return state


@pytest.fixture(scope="module")
def swin_b():
    return build_model("swinunetr", in_channels=1, out_channels=14, size="B")


EXPECTED = {
    "voco_ssl_head": {"layout": "voco_ssl_head", "renamed": {"strip module.", "strip backbone."}, "v2": True},
    "vocomni": {"layout": "vocomni", "renamed": set(), "v2": True},
    "voco_v1": {"layout": "voco_v1", "renamed": {"strip module.", "swin_vit. -> swinViT."}, "v2": True},
    "suprem_swinunetr": {"layout": "suprem", "renamed": {"strip module.", "strip backbone."}, "v2": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_every_encoder_tensor_of_a_released_layout_loads(layout, swin_b, tmp_path):
    path = tmp_path / DOC["layouts"][layout]["file"]
    raw = released_file(path, layout)
    model = build_model("swinunetr", in_channels=1, out_channels=14, size="B")
    rep = load_pretrained(model, path, exclude=("out.",))
    exp = EXPECTED[layout]
    assert rep.layout == exp["layout"]
    assert exp["renamed"] <= set(rep.renamed), rep.renamed
    assert not rep.mismatched and not rep.adapted
    decoder = tuple(model.decoder_prefixes)
    # every tensor of the file that belongs to the backbone's encoder went into the model
    enc_loaded = [k for k in rep.loaded if not k.startswith(decoder)]
    enc_in_file = [k for k in rep.loaded + rep.skipped + rep.excluded
                   if k.startswith(("swinViT.", "encoder"))]
    assert sorted(enc_in_file) == sorted(enc_loaded) and len(enc_loaded) > 100
    assert rep.encoder["model"] == len([n for n in model.state_dict() if not n.startswith(decoder)])
    if exp["v2"]:
        assert rep.encoder["missing"] == [] and rep.encoder["loaded"] == rep.encoder["model"]
    else:  # SuPreM is SwinUNETR v1: only MONAI's v2 residual blocks (layersNc) stay at init
        assert rep.encoder["missing"] and all(".layers1c." in n or ".layers2c." in n or ".layers3c." in n
                                              or ".layers4c." in n for n in rep.encoder["missing"])
    # the training heads are reported, not loaded
    assert all(not k.startswith(("student.", "teacher.", "proj_head.", "precls_conv.", "controller."))
               for k in rep.loaded)
    # values arrive unchanged under the mapped name
    src = next(k for k in raw if k.endswith("patch_embed.proj.weight"))
    assert torch.equal(model.state_dict()["swinViT.patch_embed.proj.weight"], raw[src])
    assert "encoder" in rep.summary() and rep.layout in rep.summary()


def test_our_own_checkpoints_keep_the_voco_layout():
    net = build_model("cnn_small", out_channels=3, feature_size=4)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    state["projector.0.weight"] = torch.zeros(2, 2)
    rep = load_pretrained(build_model("cnn_small", out_channels=3, feature_size=4), {"model": state})
    assert rep.layout == "voco" and rep.skipped == ["projector.0.weight"] and not rep.missing


def test_schema_names_the_released_checkpoints(repo_root):
    import yaml

    schema = yaml.safe_load((repo_root / "config/schemas/config.schema.yaml").read_text())
    import re

    pattern = schema["properties"]["finetune"]["properties"]["inits"]["items"]["pattern"]
    for name in [*inits.OURS, *inits.RELEASED, "file:/data/x.pt"]:
        assert re.match(pattern, name), name
    for bad in ("VoCo_X_SSL_head", "file:", "imagenet"):
        assert not re.match(pattern, bad), bad


def test_init_ids_and_checkpoints_in_the_plan():
    cfg = {"paths": {"data": "data", "runs": "runs"},
           "finetune": {"pretrain_run": "default",
                        "inits": ["scratch", "stage2", "VoCo_B_SSL_head", "file:/w/VoComni_B.pt"]}}
    assert plan.init_ids(cfg) == ["scratch", "stage2", "VoCo_B_SSL_head", "file-VoComni_B"]
    assert plan.init_checkpoint(cfg, "scratch") == []
    assert plan.init_checkpoint(cfg, "stage2") == ["runs/pretrain/default/stage2/backbone.pt"]
    assert plan.init_checkpoint(cfg, "VoCo_B_SSL_head") == ["data/weights/VoCo_B_SSL_head.pt"]
    assert plan.init_checkpoint(cfg, "file-VoComni_B") == ["/w/VoComni_B.pt"]
    assert plan.init_checkpoint(cfg, "file:/w/VoComni_B.pt") == ["/w/VoComni_B.pt"]  # the entry itself (voco check)
    import re

    w = plan.init_wildcard(cfg)
    assert re.fullmatch(w, "file-VoComni_B") and not re.fullmatch(w, "ssl")
    cfg["finetune"]["inits"] += ["file:/other/VoComni_B.pt"]
    with pytest.raises(ValueError, match="both give init id"):
        plan.init_checkpoint(cfg, "file-VoComni_B")


def test_resolve_init_names_files_and_errors(tmp_path):
    from voco.train.finetune import resolve_init

    cfg = {"paths": {"data": str(tmp_path), "runs": str(tmp_path / "runs")},
           "finetune": {"pretrain_run": "default"}, "model": {"name": "swinunetr", "size": "B"}}
    with pytest.raises(CheckpointError, match="download https://huggingface.co/Luffy503/VoCo/resolve/main/"):
        resolve_init("VoCo_B_SSL_head", cfg)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "VoCo_B_SSL_head.pt").write_bytes(b"x")
    assert resolve_init("VoCo_B_SSL_head", cfg) == ("VoCo_B_SSL_head", tmp_path / "weights/VoCo_B_SSL_head.pt")
    with pytest.raises(ConfigError, match="size L"):
        resolve_init("VoComni_L", cfg)
    f = tmp_path / "mine.pth"
    f.write_bytes(b"x")
    assert resolve_init(f"file:{f}", cfg) == ("file-mine", f)
    assert resolve_init("file-mine", cfg, str(f)) == ("file-mine", f)
    with pytest.raises(ConfigError, match="needs --init-path"):
        resolve_init("file-mine", cfg)
    with pytest.raises(ConfigError, match="released checkpoint"):
        resolve_init("imagenet", cfg)
