"""Backbones (forward / embed shapes, SPEC 2's 24F embedding, MONAI names) and weight transfer by name and shape."""

from __future__ import annotations

import argparse
import logging
import sys

import pytest
import torch

from voco.errors import CheckpointError, ConfigError
from voco.models import build_model, decoder_parameter_names, freeze_decoder, load_pretrained


@pytest.mark.parametrize(
    ("name", "feature", "embed_mult"),
    [("cnn_small", 4, 15), ("unet", 4, 16), ("segresnet", 8, 15)],
)
def test_cnn_backbones_forward_and_embed(name, feature, embed_mult):
    torch.manual_seed(0)
    m = build_model(name, in_channels=2, out_channels=3, feature_size=feature)
    x = torch.rand(2, 2, 32, 32, 32)
    assert m(x).shape == (2, 3, 32, 32, 32)
    e = m.embed(x)
    assert e.shape == (2, embed_mult * feature) and m.embed_dim == embed_mult * feature
    # the embedding is the concatenated pools of the encoder maps, in order
    maps = m.encoder_maps(x)
    assert sum(t.shape[1] for t in maps) == m.embed_dim
    assert torch.allclose(e[:, : maps[0].shape[1]], maps[0].mean(dim=(2, 3, 4)), atol=1e-6)
    # the decoder is exactly what embed leaves unused
    m.zero_grad()
    m.embed(x).sum().backward()
    unused = {n for n, p in m.named_parameters() if p.grad is None}
    assert unused == set(decoder_parameter_names(m))


def test_cnn_small_does_not_import_monai():
    import subprocess

    code = "import sys; from voco.models import build_model; build_model('cnn_small'); print('monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_swinunetr_embedding_is_24F_and_names_are_monai():
    from monai.networks.nets import SwinUNETR

    f = 12
    m = build_model("swinunetr", out_channels=5, feature_size=f)
    ref = SwinUNETR(in_channels=1, out_channels=5, feature_size=f, use_v2=True)
    assert list(m.state_dict()) == list(ref.state_dict())  # checkpoint names == MONAI attribute names
    assert {k.split(".")[0] for k in m.state_dict()} >= {"swinViT", "encoder1", "encoder10", "decoder1", "out"}
    assert m.embed_dim == 24 * f
    with torch.no_grad():
        e = m.embed(torch.rand(1, 1, 64, 64, 64))
    assert e.shape == (1, 24 * f)
    # sizes B/L/H are the paper's feature sizes (construction only: cheap)
    assert build_model("swinunetr", size="B").feature_size == 48
    n_frozen = freeze_decoder(m)
    assert n_frozen > 0 and all(not p.requires_grad for n, p in m.named_parameters() if n.startswith("decoder"))
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith(("swinViT", "encoder")))


def test_swin_checkpoint_from_plain_monai_loads_completely(tmp_path):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(1)
    ref = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, use_v2=True)
    path = tmp_path / "released.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    m = build_model("swinunetr", out_channels=3, feature_size=12)
    rep = load_pretrained(m, path)
    assert not rep.missing and not rep.mismatched and not rep.skipped
    assert torch.equal(m.state_dict()["swinViT.layers1.0.blocks.0.attn.qkv.weight"],
                       ref.state_dict()["swinViT.layers1.0.blocks.0.attn.qkv.weight"])


def test_unknown_model_or_size_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet"):
        build_model("resnet")
    with pytest.raises(ConfigError, match="size"):
        build_model("cnn_small", size="XL")


def _small(out_channels=2, in_channels=1, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn_small", in_channels=in_channels, out_channels=out_channels, feature_size=4)


def test_load_pretrained_strips_wrappers_and_reports(tmp_path, caplog):
    src = _small(out_channels=7, seed=1)
    state = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    state["module.projector.layer1.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "step": 3}, path)

    dst = _small(out_channels=2, seed=2)
    with caplog.at_level(logging.INFO, logger="voco.models.transfer"):
        rep = load_pretrained(dst, path)
    assert rep.skipped == ["projector.layer1.0.weight"]
    assert {m["name"] for m in rep.mismatched} == {"out.weight", "out.bias"}
    assert set(rep.missing) == {"out.weight", "out.bias"}
    assert "out.weight" in caplog.text and "projector.layer1.0.weight" in caplog.text
    for k, v in src.state_dict().items():
        if not k.startswith("out."):
            assert torch.equal(dst.state_dict()[k], v), k
    d = rep.to_dict()
    assert d["n_loaded"] == len(rep.loaded) and d["source"] == str(path)


def test_load_pretrained_exclude_and_raw_state_dict():
    src = _small(seed=1)
    dst = _small(seed=2)
    rep = load_pretrained(dst, dict(src.state_dict()), exclude=("out.",))
    assert set(rep.excluded) == {"out.weight", "out.bias"}
    assert not torch.equal(dst.state_dict()["out.weight"], src.state_dict()["out.weight"])
    assert torch.equal(dst.state_dict()["stem.conv.weight"], src.state_dict()["stem.conv.weight"])


def test_first_conv_widened_to_more_input_channels():
    src = _small(in_channels=1, seed=1)
    dst = _small(in_channels=4, seed=2)
    rep = load_pretrained(dst, src.state_dict())
    assert [a["name"] for a in rep.adapted] == ["stem.conv.weight"]
    w = dst.state_dict()["stem.conv.weight"]
    assert w.shape[1] == 4 and torch.allclose(w, src.state_dict()["stem.conv.weight"].repeat(1, 4, 1, 1, 1) / 4)
    dst2 = _small(in_channels=4, seed=2)
    before = dst2.state_dict()["stem.conv.weight"].clone()
    rep2 = load_pretrained(dst2, src.state_dict(), in_channels_mode="reinit")
    assert "stem.conv.weight" in {m["name"] for m in rep2.mismatched}
    assert torch.equal(dst2.state_dict()["stem.conv.weight"], before)


def test_loading_never_unpickles_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _small().state_dict(), "args": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_pretrained(_small(), path)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_pretrained(_small(), bad)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(_small(), {"foo.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(_small(), tmp_path / "missing.pt")
