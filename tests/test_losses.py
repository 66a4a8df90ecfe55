"""voco.train.losses.DiceCELoss is MONAI's DiceCELoss(to_onehot_y=True, softmax=True): value and gradient."""

from __future__ import annotations

import pytest
import torch

from voco.train.losses import DiceCELoss

monai_losses = pytest.importorskip("monai.losses")


def _value_and_grad(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.clone().requires_grad_(True)
    value = loss_fn(x, labels)
    value.backward()
    return value.detach(), x.grad


def _check(logits: torch.Tensor, labels: torch.Tensor, include_background: bool) -> None:
    ref = monai_losses.DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True)
    v_ref, g_ref = _value_and_grad(ref, logits, labels)
    v, g = _value_and_grad(DiceCELoss(include_background), logits, labels)
    assert v.shape == v_ref.shape == ()
    assert torch.allclose(v, v_ref, atol=1e-6, rtol=0), (float(v), float(v_ref))
    assert torch.allclose(g, g_ref, atol=1e-6, rtol=0), float((g - g_ref).abs().max())


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial", [(7, 9), (5, 6, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("k", [2, 10])
def test_dicece_matches_monai(include_background, spatial, k):
    g = torch.Generator().manual_seed(1000 * k + len(spatial))
    logits = 3 * torch.randn(3, k, *spatial, generator=g)
    labels = torch.randint(0, k, (3, 1, *spatial), generator=g)
    _check(logits, labels, include_background)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("spatial", [(8, 8), (4, 5, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("k", [2, 10])
def test_dicece_matches_monai_with_absent_classes(include_background, spatial, k):
    """One case all background, one with a single class missing (the smoothing terms decide those Dice ratios)."""
    g = torch.Generator().manual_seed(7 + k)
    logits = torch.randn(3, k, *spatial, generator=g)
    labels = torch.randint(0, k, (3, 1, *spatial), generator=g)
    labels[0] = 0
    labels[1][labels[1] == k - 1] = 0
    _check(logits, labels, include_background)


def test_dicece_perfect_prediction_and_integer_dtypes():
    """A near-perfect prediction scores ~0; uint8 / int32 labels (what the loaders give) work as long ones do."""
    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    labels[0, 0, 0, 0, 0] = 1
    logits = torch.full((1, 2, 4, 4, 4), -20.0)
    logits[:, 0] = 20.0
    logits[0, 1, 0, 0, 0], logits[0, 0, 0, 0, 0] = 20.0, -20.0
    loss = DiceCELoss(False)
    assert float(loss(logits, labels)) < 1e-4
    for dtype in (torch.uint8, torch.int32):
        assert float(loss(logits, labels.to(dtype))) == float(loss(logits, labels))


def test_dicece_rejects_bad_shapes():
    with pytest.raises(ValueError):
        DiceCELoss()(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        DiceCELoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_finetune_uses_ours():
    from voco.train.finetune import dicece_loss

    assert isinstance(dicece_loss(), DiceCELoss) and not dicece_loss().include_background
    assert dicece_loss(True).include_background
