"""The memory-efficient Swin window attention equals MONAI's (forward and every gradient, fp32, 1e-5), keeps no
per-window attention matrices for backward, and leaves the SwinUNETR state dict exactly MONAI's."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import BasicLayer, WindowAttention, compute_mask

import voco.models.window_attention as wa
from voco.errors import ConfigError
from voco.models import build_model
from voco.models.window_attention import EfficientWindowAttention, set_window_attention, window_attention

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def reference_attention(q, k, v, bias, mask, scale):
    """MONAI's arithmetic, written out: softmax(q*scale @ k^T + bias + mask[w]) @ v."""
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nw, (b, h, n, _) = mask.shape[0], attn.shape
        attn = (attn.view(b // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(b, h, n, n)
    return torch.softmax(attn, -1) @ v


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_window_attention_matches_the_reference_in_value_and_gradients(monkeypatch, shifted, fused):
    # a small chunk budget: chunks of 2 windows over 27 windows per crop -> a remainder chunk in every crop
    monkeypatch.setattr(wa, "CHUNK_ELEMENTS", 2 * 3 * 27 * 27)
    torch.manual_seed(0)
    crops, nw, h, n, d = 2, 27, 3, 27, 4  # 3^3-token windows on a 9^3 grid, shift 1
    mask = compute_mask([9, 9, 9], (3, 3, 3), (1, 1, 1), "cpu") if shifted else None
    assert (mask is None) or (mask.shape == (nw, n, n) and (mask != 0).any())
    q, k, v = (torch.randn(crops * nw, h, n, d, requires_grad=True) for _ in range(3))
    bias = (0.5 * torch.randn(h, n, n)).requires_grad_()
    grad_out = torch.randn(crops * nw, h, n, d)
    out = window_attention(q, k, v, bias, mask, 0.5, fused=fused)
    grads = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    ref = reference_attention(q, k, v, bias, mask, 0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v, bias), grad_out)
    assert rel_err(out, ref) < TOL
    for name, g, r in zip("q k v bias".split(), grads, ref_grads, strict=True):
        assert rel_err(g, r) < TOL, name
    with torch.no_grad():  # inference path: no autograd function, same values
        assert rel_err(window_attention(q, k, v, bias, mask, 0.5, fused=fused), ref) < TOL


def test_window_attention_rejects_a_mask_that_does_not_tile_the_windows():
    q = torch.randn(5, 1, 8, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        window_attention(q, q, q, torch.zeros(1, 8, 8), torch.zeros(2, 8, 8), 1.0)


def _layer_pair(dim: int, heads: int, seed: int = 0, checkpoint: bool = False) -> tuple[BasicLayer, BasicLayer]:
    torch.manual_seed(seed)
    ref = BasicLayer(dim=dim, depth=2, num_heads=heads, window_size=(7, 7, 7), drop_path=[0.0, 0.0], qkv_bias=True,
                     use_checkpoint=checkpoint)
    with torch.no_grad():  # MONAI initialises the bias table with std 0.02; make it matter
        for blk in ref.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)
    ours = copy.deepcopy(ref)
    assert set_window_attention(ours, "efficient") == 2
    return ref, ours


@pytest.mark.parametrize(
    ("spatial", "checkpoint"),
    [
        ((14, 14, 14), False),  # a multiple of the window: no padding
        ((9, 12, 10), False),  # padded to 14^3 (MONAI attends to the zero-padded tokens; so do we)
        ((5, 9, 16), False),  # a side <= 7 shrinks the window and drops the shift on that axis; the others pad
        ((9, 12, 10), True),  # under MONAI's gradient checkpointing (the paper configuration's use_checkpoint)
    ],
)
def test_swin_layer_with_shifted_and_unshifted_blocks_equals_monai(spatial, checkpoint):
    """BasicLayer = block 0 (no shift) + block 1 (shifted by 3, with MONAI's -100 mask): forward and the gradients
    of the input and of every parameter, the relative-position bias tables included."""
    ref, ours = _layer_pair(dim=12, heads=3, checkpoint=checkpoint)
    torch.manual_seed(1)
    x = torch.randn(2, 12, *spatial)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yo * w).sum().backward()
    assert rel_err(yo, yr) < TOL
    assert rel_err(xo.grad, xr.grad) < TOL
    pr, po = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert pr.keys() == po.keys()
    assert any("relative_position_bias_table" in n for n in pr)
    for name in pr:
        assert rel_err(po[name].grad, pr[name].grad) < TOL, name


def test_efficient_attention_keeps_no_per_window_matrices():
    """MONAI saves (windows x heads x n x n) attention matrices per crop; ours saves nothing larger than the one
    (heads x n x n) relative-position bias per block, whatever the number of windows and crops (not counted: the
    layer's own (windows x n x n) shift mask, which is referenced, not copied)."""
    ref, ours = _layer_pair(dim=12, heads=3)
    x = torch.randn(1, 12, 14, 14, 14)
    n, windows, heads = 343, 8, 3

    def largest_saved(module: torch.nn.Module) -> int:
        sizes: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape) != (windows, n, n):  # the shift mask
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x.clone().requires_grad_())
        return max(sizes)

    per_crop_matrices = windows * heads * n * n
    assert largest_saved(ref) >= per_crop_matrices  # MONAI keeps them ...
    assert largest_saved(ours) <= heads * n * n  # ... ours keeps activations and the bias


def test_attention_dropout_in_training_falls_back_to_monai():
    torch.manual_seed(0)
    m = WindowAttention(12, 3, (3, 3, 3), qkv_bias=True, attn_drop=0.5)
    e = EfficientWindowAttention.from_monai(copy.deepcopy(m))
    x = torch.randn(4, 27, 12)
    torch.manual_seed(5)
    a = m(x, None)
    torch.manual_seed(5)
    b = e(x, None)
    assert torch.equal(a, b)
    with pytest.raises(TypeError):
        EfficientWindowAttention.from_monai(torch.nn.Linear(2, 2))


def _monai_swin(seed: int, feature: int = 12) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=3, feature_size=feature, use_v2=True)


def test_our_swinunetr_is_monai_with_the_efficient_attention_by_default():
    torch.manual_seed(3)
    ours = build_model("swinunetr", out_channels=3, feature_size=12)
    ref = _monai_swin(3)
    attn = [m for m in ours.modules() if isinstance(m, WindowAttention)]
    assert len(attn) == 8 and all(type(m) is EfficientWindowAttention for m in attn)
    # same seed -> the very same initial weights (switching the attention re-initialises nothing)
    sd, rd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(rd)
    assert all(torch.equal(sd[k], rd[k]) for k in sd)
    fallback = build_model("swinunetr", out_channels=3, feature_size=12, window_attention="monai")
    assert all(type(m) is WindowAttention for m in fallback.modules() if isinstance(m, WindowAttention))
    assert fallback.window_attention == "monai" and ours.window_attention == "efficient"
    with pytest.raises(ConfigError, match="window_attention"):
        build_model("swinunetr", feature_size=12, window_attention="flash")
    build_model("cnn_small", window_attention="monai")  # other backbones ignore it


def test_state_dicts_round_trip_between_monai_and_ours(tmp_path):
    """Ours -> file -> MONAI SwinUNETR (strict) and MONAI -> ours (strict): identical tensors, identical outputs."""
    torch.manual_seed(7)
    ours = build_model("swinunetr", out_channels=3, feature_size=12)
    with torch.no_grad():  # make the bias tables distinctive
        for m in ours.modules():
            if isinstance(m, WindowAttention):
                m.relative_position_bias_table.normal_()
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    monai = _monai_swin(99)
    monai.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True), strict=True)
    back = build_model("swinunetr", out_channels=3, feature_size=12)
    back.load_state_dict(monai.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(monai.state_dict()[k], v) and torch.equal(back.state_dict()[k], v), k
    x = torch.randn(1, 1, 64, 64, 64)
    for m in (ours, monai, back):
        m.eval()
    with torch.no_grad():
        y_ours, y_monai, y_back = ours(x), monai(x), back(x)
    assert rel_err(y_ours, y_monai) < TOL and torch.equal(y_ours, y_back)


def test_whole_swin_encoder_gradients_equal_monai_on_a_padded_input():
    """SwinUNETR's Swin encoder (4 stages; 16x32x48 tokens pad to 21x35x49 at stage 0), all parameter gradients."""
    ref = _monai_swin(11)
    ours = copy.deepcopy(ref)
    set_window_attention(ours, "efficient")
    x = torch.randn(1, 1, 32, 64, 96)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    hr, ho = ref.swinViT(xr), ours.swinViT(xo)
    ws = [torch.randn_like(t) for t in hr]
    sum((t * w).sum() for t, w in zip(hr, ws, strict=True)).backward()
    sum((t * w).sum() for t, w in zip(ho, ws, strict=True)).backward()
    for a, b in zip(ho, hr, strict=True):
        assert rel_err(a, b) < TOL
    assert rel_err(xo.grad, xr.grad) < TOL
    for (name, pr), (_, po) in zip(ref.swinViT.named_parameters(), ours.swinViT.named_parameters(), strict=True):
        assert rel_err(po.grad, pr.grad) < TOL, name


def test_bf16_autocast_runs_the_core_in_float32():
    torch.manual_seed(0)
    m = WindowAttention(12, 3, (3, 3, 3), qkv_bias=True)
    e = EfficientWindowAttention.from_monai(copy.deepcopy(m))
    x = torch.randn(4, 27, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = e(x, None)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), m(x, None)) < 0.05
