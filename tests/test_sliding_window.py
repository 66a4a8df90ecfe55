"""voco.eval.sliding.sliding_window_inference is MONAI's sliding_window_inference for the arguments voco uses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from voco.eval.sliding import importance_map, scan_interval, sliding_window_inference, window_slices

monai_inferers = pytest.importorskip("monai.inferers")

ROI = (8, 6, 10)
SHAPES = {
    "larger": (21, 13, 17),  # every axis longer than the window
    "equal_x": (8, 15, 11),  # x equals the window
    "smaller_x": (5, 16, 10),  # x shorter (odd padding 3 = 1 before + 2 after), z equal
    "smaller_yz": (19, 2, 3),  # two axes shorter
    "smaller_all": (4, 5, 7),  # one window, padded on every axis
}


def _net(in_channels: int = 2, out_channels: int = 3) -> nn.Module:
    """A small deterministic conv net (zero padding: the output near a window's edge depends on the window)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, out_channels, 3, padding=1))
    return net.eval()


def _volume(shape, channels: int = 2, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sw_batch_size", [1, 4])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("case", sorted(SHAPES))
@torch.no_grad()
def test_matches_monai(case, overlap, mode, sw_batch_size):
    net = _net()
    x = _volume(SHAPES[case])
    kw = dict(roi_size=ROI, sw_batch_size=sw_batch_size, predictor=net, overlap=overlap, mode=mode)
    ref = monai_inferers.sliding_window_inference(x, **kw)
    out = sliding_window_inference(x, **kw)
    assert out.shape == ref.shape == (1, 3, *SHAPES[case])
    assert out.dtype == ref.dtype == torch.float32
    assert torch.allclose(out, torch.as_tensor(ref), atol=1e-5, rtol=0), float((out - ref).abs().max())


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@torch.no_grad()
def test_matches_monai_batch_of_cases_and_devices(mode):
    """Two cases in one batch (windows batched across cases), one input channel, sw_device / device given."""
    net = _net(in_channels=1, out_channels=2)
    x = _volume((11, 9, 14), channels=1, batch=2, seed=3)
    kw = dict(roi_size=(6, 6, 6), sw_batch_size=3, predictor=net, overlap=0.5, mode=mode, sw_device="cpu",
              device=torch.device("cpu"))
    ref = monai_inferers.sliding_window_inference(x, **kw)
    out = sliding_window_inference(x, **kw)
    assert out.device.type == "cpu"
    assert torch.allclose(out, torch.as_tensor(ref), atol=1e-5, rtol=0)


@torch.no_grad()
def test_matches_monai_2d():
    net = nn.Conv2d(2, 3, 3, padding=1).eval()
    x = torch.randn(1, 2, 23, 5, generator=torch.Generator().manual_seed(1))
    kw = dict(roi_size=(8, 8), sw_batch_size=2, predictor=net, overlap=0.6, mode="gaussian")
    assert torch.allclose(sliding_window_inference(x, **kw),
                          torch.as_tensor(monai_inferers.sliding_window_inference(x, **kw)), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
@torch.no_grad()
def test_matches_monai_on_cuda(amp):
    """Windows on the GPU, blended output on the CPU, with and without autocast (predict_probs' set-up)."""
    net = _net().cuda()
    x = _volume(SHAPES["larger"])
    kw = dict(roi_size=ROI, sw_batch_size=4, predictor=net, overlap=0.75, mode="gaussian", sw_device="cuda",
              device="cpu")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        ref = monai_inferers.sliding_window_inference(x, **kw)
        out = sliding_window_inference(x, **kw)
    assert out.device.type == "cpu"
    assert torch.allclose(out, torch.as_tensor(ref), atol=1e-5, rtol=0), float((out - ref).abs().max())


@pytest.mark.parametrize("roi", [(8, 6, 10), (96, 96, 96), (64, 32, 5)])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.05])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_matches_monai(roi, sigma_scale, mode):
    """Including the clamp of tiny values (sigma_scale 0.05 on a large window puts the corners far below 1e-3)."""
    from monai.data.utils import compute_importance_map

    ref = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale)
    ours = importance_map(roi, mode=mode, sigma_scale=sigma_scale)
    assert ours.shape == ref.shape == roi and ours.dtype == ref.dtype
    assert torch.allclose(ours, ref, atol=1e-7, rtol=0)
    if mode == "gaussian" and sigma_scale == 0.05 and min(roi) >= 32:
        assert float(ours.min()) == pytest.approx(1e-3)


def test_window_positions_match_monai():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for image in [(8, 8, 8), (9, 30, 17), (40, 61, 33), (8, 50, 8)]:
        for roi in [(8, 8, 8), (8, 6, 5), (4, 30, 7)]:
            size = tuple(max(i, r) for i, r in zip(image, roi, strict=True))
            for overlap in (0.0, 0.25, 0.5, 0.75, 0.9):
                steps = scan_interval(size, roi, (overlap,) * 3)
                assert steps == _get_scan_interval(size, roi, 3, (overlap,) * 3)
                assert window_slices(size, roi, steps) == dense_patch_slices(size, roi, steps)


@torch.no_grad()
def test_progress_and_errors():
    net = _net()
    x = _volume((12, 9, 11))
    kw = dict(roi_size=ROI, sw_batch_size=2, predictor=net, overlap=0.5, mode="gaussian")
    assert torch.equal(sliding_window_inference(x, progress=True, **kw), sliding_window_inference(x, **kw))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, **{**kw, "overlap": 1.0})
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(x, **{**kw, "mode": "triangle"})
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(x, **{**kw, "roi_size": (8, 8)})


def test_predict_probs_matches_monai():
    from voco.eval.inference import predict_probs

    net = _net(in_channels=1, out_channels=3)
    image = torch.randn(13, 7, 20, generator=torch.Generator().manual_seed(5)).numpy()
    probs = predict_probs(net, image, ROI, overlap=0.75, sw_batch_size=4, mode="gaussian")
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(torch.as_tensor(image)[None, None], ROI, 4, net, overlap=0.75,
                                                      mode="gaussian", sw_device="cpu", device="cpu")
    assert probs.shape == (3, 13, 7, 20) and probs.dtype == torch.float32
    assert torch.allclose(probs, torch.softmax(torch.as_tensor(ref).float(), dim=1)[0], atol=1e-5, rtol=0)


def test_evaluate_and_inference_do_not_import_monai():
    """The modules voco evaluate / finetune load for cnn_small start without MONAI (its import costs seconds)."""
    code = ("import sys; import voco.eval.evaluate, voco.eval.inference, voco.train.finetune, voco.commands.evaluate, "
            "voco.commands.finetune; from voco.models import build_model; from voco.train.finetune import dicece_loss; "
            "build_model('cnn_small', 1, 3, feature_size=8); dicece_loss(); "
            "print(sorted(m for m in sys.modules if m == 'monai' or m.startswith('monai.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
