"""voco.ssl.losses: values against hand-computed / loop forms, float64 gradchecks, gradient routing, minima."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from voco.ssl.crops import position_labels, sample_centers
from voco.ssl.losses import (
    paper_prediction_loss,
    prediction_loss,
    pretext_accuracy,
    regularization_loss,
    relu_cosine,
    voco_loss,
    voco_v1_loss,
)

EPS = 1e-6


def labels_for(b: int, sw: int, grid: int = 3, roi: int = 8, seed: int = 0) -> torch.Tensor:
    import numpy as np

    rng = np.random.default_rng(seed)
    return torch.stack(
        [position_labels(sample_centers(sw, grid, roi, rng), roi, grid, torch.float64) for _ in range(b)]
    )


def views(b: int = 3, sw: int = 2, n: int = 9, d: int = 16, seed: int = 0, grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(b, k, d, generator=g, dtype=torch.float64, requires_grad=grad) for k in (sw, n, sw, n)]
    return (*t, labels_for(b, sw, seed=seed))


def loop_pos_neg(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """SPEC 2's formula written out entry by entry for one volume (sw x n)."""
    pos_num = pos_den = neg_num = neg_den = 0.0
    for s in range(y.shape[0]):
        for k in range(y.shape[1]):
            yy, pp = float(y[s, k]), float(p[s, k])
            pos_num += -yy * math.log(1 - abs(yy - pp) + EPS)
            pos_den += yy
            if yy == 0:
                neg_num += -math.log(1 - pp + EPS)
                neg_den += 1
    return torch.tensor(pos_num / (pos_den + EPS) + neg_num / (neg_den + EPS), dtype=torch.float64)


# ---------------------------------------------------------------- similarity
def test_relu_cosine_matches_pairwise_cosine() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    s = relu_cosine(a, b)
    assert s.shape == (4, 5) and s.dtype == torch.float64
    ref = torch.stack([F.relu(F.cosine_similarity(a[i : i + 1], b, dim=1)) for i in range(4)])
    torch.testing.assert_close(s, ref)
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0 + 1e-12
    torch.testing.assert_close(relu_cosine(a, -a).diagonal(), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(relu_cosine(a, 3 * a).diagonal(), torch.ones(4, dtype=torch.float64))
    batched = relu_cosine(torch.stack([a, 2 * a]), torch.stack([b, b]))  # (2, 4, 5)
    torch.testing.assert_close(batched, torch.stack([s, s]))
    assert torch.equal(relu_cosine(torch.zeros(1, 7), torch.ones(2, 7)), torch.zeros(1, 2))  # zero rows: 0, not NaN


def test_relu_cosine_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_cosine, (a, b))


# ---------------------------------------------------------------- prediction loss
def test_prediction_loss_hand_values() -> None:
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # P = [0.5, 0.5]: pos = -log(0.5 + eps) / (1 + eps), neg = -log(0.5 + eps) / (1 + eps)
    expect = -2 * math.log(0.5 + EPS) / (1 + EPS)
    assert prediction_loss(torch.tensor([[0.5, 0.5]], dtype=torch.float64), y).item() == pytest.approx(expect, 1e-12)
    # perfect prediction: both terms are -log(1 + eps) ~ -1e-6
    assert prediction_loss(y.clone(), y).item() == pytest.approx(-2 * math.log(1 + EPS) / (1 + EPS), abs=1e-12)
    # corner crop: four 0.25 labels, P = 0.25 there, 0 elsewhere -> near zero; P = 1 on a negative -> log(eps)
    y = position_labels([[8, 8]], 8, 3, torch.float64)
    assert prediction_loss(y.clone(), y).item() == pytest.approx(0.0, abs=1e-5)
    p = y.clone()
    p[0, 8] = 1.0
    assert prediction_loss(p, y).item() == pytest.approx(-math.log(EPS) / 5, rel=1e-4)


def test_prediction_loss_matches_the_written_out_formula_and_averages_volumes() -> None:
    y = labels_for(4, 3)
    p = torch.rand(4, 3, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    per = torch.stack([loop_pos_neg(y[v], p[v]) for v in range(4)])
    torch.testing.assert_close(prediction_loss(p, y), per.mean())
    torch.testing.assert_close(prediction_loss(p[1], y[1]), per[1])
    # paper form: -(1/n) sum log(1 - |y - s|), averaged over crops and volumes
    torch.testing.assert_close(paper_prediction_loss(p, y), -torch.log(1 - (y - p).abs() + EPS).mean())


def test_prediction_loss_minimum_is_at_the_labels() -> None:
    y = labels_for(1, 64, seed=3)[0]
    best = prediction_loss(y.clone(), y)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = (y + 0.2 * torch.randn(y.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        assert prediction_loss(p, y) > best
        assert paper_prediction_loss(p, y) > paper_prediction_loss(y.clone(), y)


def test_prediction_loss_gradcheck_and_target_gets_no_grad() -> None:
    y = labels_for(2, 2, seed=4).clone().requires_grad_(True)
    # keep away from the kinks |y - P| = 0 and from P = 1
    p = 0.1 + 0.8 * torch.rand(2, 2, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: prediction_loss(q, y.detach()), (p,))
    assert torch.autograd.gradcheck(lambda q: prediction_loss(q, y.detach(), neg="square"), (p,))
    assert torch.autograd.gradcheck(lambda q: paper_prediction_loss(q, y.detach()), (p,))
    prediction_loss(p, y).backward()
    assert y.grad is None and p.grad is not None


def test_prediction_loss_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        prediction_loss(torch.zeros(2, 9), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="neg"):
        prediction_loss(torch.zeros(2, 9), torch.zeros(2, 9), neg="abs")


# ---------------------------------------------------------------- regularisation
def test_regularization_loss_matches_pair_loop_and_paper_form() -> None:
    b = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sq, ab = [], []
    for v in range(2):
        s = [F.relu(F.cosine_similarity(b[v, k], b[v, m], dim=0)) for k in range(5) for m in range(k + 1, 5)]
        sq.append(torch.stack(s).pow(2).mean())
        ab.append(torch.stack(s).abs().mean())
    torch.testing.assert_close(regularization_loss(b), torch.stack(sq).mean())
    torch.testing.assert_close(regularization_loss(b[0]), sq[0])
    torch.testing.assert_close(regularization_loss(b, form="paper"), torch.stack(ab).mean())
    # orthogonal bases: zero; identical bases: one
    assert regularization_loss(torch.eye(4, dtype=torch.float64)).item() == 0.0
    assert regularization_loss(torch.ones(4, 3)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        regularization_loss(torch.ones(1, 3))


def test_regularization_gradient_goes_to_the_first_of_each_pair_only() -> None:
    # positive entries: every cosine is > 0, so the ReLU passes every pair's gradient
    b = torch.rand(4, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
    regularization_loss(b).backward()
    assert torch.all(b.grad[:3].abs().sum(1) > 0)
    assert torch.equal(b.grad[3], torch.zeros(8, dtype=torch.float64))  # b_{n-1} only ever sits on the stop-grad side

    # the same gradient as the loss with the stop-grad side passed as a constant, which gradcheck can verify
    def explicit(x: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        s = relu_cosine(x, const)
        k, m = torch.triu_indices(4, 4, 1)
        return s[k, m].pow(2).mean()

    const = b.detach().clone()
    x = b.detach().clone().requires_grad_(True)
    explicit(x, const).backward()
    torch.testing.assert_close(b.grad, x.grad)
    assert torch.autograd.gradcheck(lambda z: explicit(z, const), (x.detach().clone().requires_grad_(True),))


# ---------------------------------------------------------------- voco_loss
def test_voco_loss_values_against_the_written_out_form() -> None:
    sr, sb, tr, tb, y = views(b=3, seed=7, grad=False)
    out = voco_loss(sr, sb, tr, tb, y)
    assert set(out) >= {"pred", "inter", "reg", "total", "sim"}
    assert all(out[k].ndim == 0 and out[k].dtype == torch.float64 for k in ("pred", "inter", "reg", "total"))
    pred = torch.stack([loop_pos_neg(y[v], relu_cosine(sr[v], tb[v])) for v in range(3)]).mean()
    inter = torch.stack(
        [loop_pos_neg(relu_cosine(tr[v], tb[(v + 1) % 3]), relu_cosine(sr[v], sb[(v + 1) % 3])) for v in range(3)]
    ).mean()
    torch.testing.assert_close(out["pred"], pred)
    torch.testing.assert_close(out["inter"], inter)
    torch.testing.assert_close(out["reg"], regularization_loss(sb))
    torch.testing.assert_close(out["total"], pred + inter + out["reg"])
    torch.testing.assert_close(out["sim"], relu_cosine(sr, tb))
    w = voco_loss(sr, sb, tr, tb, y, w_pred=2.0, w_inter=0.5, w_reg=0.0)
    torch.testing.assert_close(w["total"], 2 * pred + 0.5 * inter)


def test_voco_loss_single_volume_is_its_own_partner() -> None:
    sr, sb, tr, tb, y = views(b=1, seed=8, grad=False)
    out = voco_loss(sr, sb, tr, tb, y)
    torch.testing.assert_close(out["inter"], loop_pos_neg(relu_cosine(tr[0], tb[0]), relu_cosine(sr[0], sb[0])))


def test_voco_loss_paper_form() -> None:
    sr, sb, tr, tb, y = views(b=2, seed=9, grad=False)
    out = voco_loss(sr, sb, tr, tb, y, loss_form="paper")
    p = relu_cosine(sr, tb)
    t = relu_cosine(tr, tb.roll(-1, 0))
    s = relu_cosine(sr, sb.roll(-1, 0))
    torch.testing.assert_close(out["pred"], -torch.log(1 - (y - p).abs() + EPS).mean())
    torch.testing.assert_close(out["inter"], -torch.log(1 - (t - s).abs() + EPS).mean())
    torch.testing.assert_close(out["reg"], regularization_loss(sb, form="paper"))
    with pytest.raises(ValueError, match="loss_form"):
        voco_loss(sr, sb, tr, tb, y, loss_form="other")


def test_voco_loss_gradient_routing() -> None:
    sr, sb, tr, tb, y = views(b=3, seed=10)
    out = voco_loss(sr, sb, tr, tb, y)
    # pred: only the student random crops
    g_sr, g_sb = torch.autograd.grad(out["pred"], (sr, sb), allow_unused=True)
    assert g_sr is not None and g_sr.abs().sum() > 0 and g_sb is None
    # inter: student random crops and the partner's student base crops
    g_sr, g_sb = torch.autograd.grad(out["inter"], (sr, sb), retain_graph=True)
    assert g_sr.abs().sum() > 0 and torch.all(g_sb.abs().sum((1, 2)) > 0)
    # reg: student base crops only
    g_sr, g_sb = torch.autograd.grad(out["reg"], (sr, sb), allow_unused=True)
    assert g_sr is None and g_sb.abs().sum() > 0
    # total: teacher tensors never receive a gradient
    out = voco_loss(sr, sb, tr, tb, y)
    out["total"].backward()
    assert tr.grad is None and tb.grad is None
    assert sr.grad is not None and sb.grad is not None


def test_inter_gradient_reaches_the_partner_volume_only() -> None:
    sr, sb, tr, tb, y = views(b=3, seed=11)
    out = voco_loss(
        sr[:1].expand(3, -1, -1) * torch.tensor([1.0, 0, 0], dtype=torch.float64)[:, None, None],
        sb,
        tr,
        tb,
        y,
        w_pred=0.0,
        w_reg=0.0,
    )
    # only volume 0 has non-zero random crops -> its partner u = 1 is the only base set with a gradient
    (g,) = torch.autograd.grad(out["total"], (sb,))
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0


def test_voco_loss_gradcheck_float64() -> None:
    sr, sb, tr, tb, y = views(b=2, n=4, sw=2, d=6, seed=12, grad=False)
    y = labels_for(2, 2, grid=2, roi=8, seed=12)
    sr = sr.clone().requires_grad_(True)
    # student random crops: every term that reads them is a plain function of them -> exact gradcheck
    assert torch.autograd.gradcheck(lambda x: voco_loss(x, sb, tr, tb, y)["total"], (sr,))
    assert torch.autograd.gradcheck(lambda x: voco_loss(x, sb, tr, tb, y, loss_form="paper")["total"], (sr,))
    # student base crops through the inter term (reg has a stop-grad by design, see the test above)
    sb = sb.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: voco_loss(sr.detach(), x, tr, tb, y)["inter"], (sb,))


def test_voco_loss_shape_checks() -> None:
    sr, sb, tr, tb, y = views(b=2, grad=False)
    with pytest.raises(ValueError, match="labels"):
        voco_loss(sr, sb, tr, tb, y[:, :, :4])
    with pytest.raises(ValueError, match="teacher_base"):
        voco_loss(sr, sb, tr, tb[:1], y)


def test_optimising_free_embeddings_reaches_the_labels() -> None:
    """The loss minimum is where P = y: free student embeddings learn the positions (accuracy -> 1).

    Orthonormal teacher bases make P = y exactly reachable (sum_k y_k^2 <= 1); positive initial embeddings keep the
    ReLU of the cosine alive at the start, as embeddings of real crops are.
    """
    torch.manual_seed(0)
    b, sw, n, d = 2, 6, 9, 16
    y = labels_for(b, sw, seed=13).float()
    tb = torch.eye(n, d).expand(b, n, d)
    tr = torch.rand(b, sw, d)
    sr = torch.rand(b, sw, d, requires_grad=True)
    sb = torch.rand(b, n, d, requires_grad=True)
    opt = torch.optim.Adam([sr, sb], lr=0.05)
    first = voco_loss(sr, sb, tr, tb, y)
    for _ in range(150):
        out = voco_loss(sr, sb, tr, tb, y)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    out = voco_loss(sr, sb, tr, tb, y)
    assert pretext_accuracy(first["sim"], y).item() < 0.5
    assert out["pred"].item() < 0.02 * first["pred"].item() and out["reg"].item() < 0.01
    assert out["total"].item() < 0.1 * first["total"].item()
    assert pretext_accuracy(out["sim"], y).item() == 1.0
    assert (out["sim"] - y).abs().max().item() < 0.15


# ---------------------------------------------------------------- voco-v1
def test_voco_v1_loss() -> None:
    sr, sb, tr, tb, y = views(b=2, n=16, seed=14)
    y = labels_for(2, 2, grid=4, roi=8, seed=14)
    out = voco_v1_loss(sr, sb, tr, tb, y)
    p = 0.5 * (relu_cosine(sr, tb) + relu_cosine(tr, sb))
    pos = torch.stack(
        [-(y[v] * torch.log(1 - (y[v] - p[v]).abs() + EPS)).sum() / (y[v].sum() + EPS) for v in range(2)]
    ).mean()
    mask = y == 0
    neg = torch.stack([p[v][mask[v]].pow(2).sum() / (mask[v].sum() + EPS) for v in range(2)]).mean()
    torch.testing.assert_close(out["pos"], pos)
    torch.testing.assert_close(out["neg"], neg)
    torch.testing.assert_close(out["total"], pos + neg + regularization_loss(sb))
    assert out["inter"].item() == 0.0
    out["total"].backward()
    assert tr.grad is None and tb.grad is None and sb.grad.abs().sum() > 0  # symmetric P reaches the student bases
    asym = voco_v1_loss(sr, sb, tr, tb, y, symmetric=False)
    torch.testing.assert_close(asym["sim"], relu_cosine(sr, tb).detach())


# ---------------------------------------------------------------- pretext accuracy
def test_pretext_accuracy() -> None:
    y = labels_for(4, 8, seed=15)
    assert pretext_accuracy(y, y).item() == 1.0
    assert pretext_accuracy(1 - y, y).item() == 0.0
    corner = position_labels([[8, 8]], 8, 3)  # tie between k = 0, 1, 3, 4
    for k, ok in ((0, 1.0), (4, 1.0), (8, 0.0)):
        p = torch.zeros(1, 9)
        p[0, k] = 1.0
        assert pretext_accuracy(p, corner).item() == ok
    g = torch.Generator().manual_seed(0)
    big = labels_for(1, 20000, roi=64, seed=16)[0]  # few ties at r = 64
    chance = pretext_accuracy(torch.rand(big.shape, generator=g, dtype=torch.float64), big).item()
    assert chance == pytest.approx(1 / 9, abs=0.02)
    with pytest.raises(ValueError):
        pretext_accuracy(torch.zeros(2, 9), torch.zeros(2, 4))
