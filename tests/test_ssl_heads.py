"""voco.ssl.heads: statistics-free BN projector, EMA teacher, feature dropout, view splitting."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from voco.ssl.crops import collate_views, sample_voco_views
from voco.ssl.heads import EMA, FeatureDropout, Projector, split_views, stat_free_batchnorm
from voco.ssl.losses import pretext_accuracy, voco_loss


def test_batchnorm_has_no_parameters_or_buffers_and_always_uses_batch_statistics() -> None:
    bn = stat_free_batchnorm(6)
    assert list(bn.parameters()) == [] and list(bn.buffers()) == [] and bn.state_dict() == {}
    x = torch.randn(10, 6, dtype=torch.float64) * 3 + 5
    y_train = bn(x)
    bn.eval()
    torch.testing.assert_close(bn(x), y_train)  # no running stats: eval normalises with the batch too
    torch.testing.assert_close(y_train.mean(0), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(y_train.var(0, unbiased=False), torch.ones(6, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_projector_layout_and_names() -> None:
    p = Projector(48, 32, 16)
    assert p(torch.randn(5, 48)).shape == (5, 16)
    # only the three Linear layers hold tensors, under the reference's names (released VoCo checkpoints map by name)
    assert sorted(p.state_dict()) == sorted(f"layer{i}.{0}.{w}" for i in (1, 2, 3) for w in ("weight", "bias"))
    kinds = [type(m).__name__ for m in p.modules() if not isinstance(m, nn.Sequential | Projector)]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    # the hidden activations after BN + ReLU: each feature normalised over the batch before the ReLU
    h = p.layer1[1](p.layer1[0](torch.randn(64, 48)))
    torch.testing.assert_close(h.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    assert Projector(1152).out_dim == 1024


def test_projector_float64_gradcheck() -> None:
    p = Projector(6, 5, 4).double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p, (x,))


def test_ema_math_and_own_init() -> None:
    torch.manual_seed(0)
    student, teacher = Projector(8, 6, 4), Projector(8, 6, 4)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema = EMA(teacher, momentum=0.9)
    assert ema.module is teacher  # the teacher keeps its own random init ...
    assert not torch.equal(teacher.layer1[0].weight, student.layer1[0].weight)
    assert all(not p.requires_grad for p in ema.parameters())  # ... and never takes a gradient
    s = {k: v.clone() for k, v in student.state_dict().items()}
    ema.update(student)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * t0[k] + 0.1 * s[k])
    for _ in range(4):
        ema.update(student)
    for k, v in teacher.state_dict().items():  # k updates toward a fixed student: m^k t0 + (1 - m^k) s
        torch.testing.assert_close(v, 0.9**5 * t0[k] + (1 - 0.9**5) * s[k])
    assert ema.updates == 5
    ema.update(student, momentum=0.0)  # per-step override
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, s[k])
    assert torch.equal(student.state_dict()["layer1.0.weight"], s["layer1.0.weight"])  # the student is untouched


def test_ema_forward_copy_of_wrappers_and_state_dict_roundtrip() -> None:
    torch.manual_seed(1)
    student = Projector(8, 6, 4)
    ema = EMA.copy_of(nn.DataParallel(student), momentum=0.5)
    assert ema.module is not student
    x = torch.randn(3, 8)
    out = ema(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, student(x).detach())
    with torch.no_grad():
        student.layer3[0].bias.add_(1.0)
    ema.update(nn.DataParallel(student))  # wrapped students are unwrapped and matched by name
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = EMA(Projector(8, 6, 4), momentum=0.9)
    other.load_state_dict(state)
    assert other.momentum == 0.5 and other.updates == 1
    torch.testing.assert_close(other(x), ema(x))
    with pytest.raises(ValueError, match="differ"):
        ema.update(Projector(8, 6, 4).layer1)
    with pytest.raises(ValueError, match="shape"):
        ema.update(Projector(8, 7, 4))
    with pytest.raises(ValueError):
        EMA(Projector(8, 6, 4), momentum=1.5)


def test_ema_copies_buffers() -> None:
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.running_mean.fill_(2.0)
    EMA(teacher, 0.9).update(student)
    assert torch.equal(teacher.running_mean, torch.full((3,), 2.0))


def test_feature_dropout_rows_and_elements() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 16)
    row = FeatureDropout(0.2)(x)
    dropped = (row == 0).all(1)
    kept = (row == 1 / 0.8).all(1)
    assert torch.all(dropped | kept)  # every row is either zeroed whole or scaled whole
    assert float(dropped.float().mean()) == pytest.approx(0.2, abs=0.03)
    el = FeatureDropout(0.2, mode="element")(x)
    zeros = el == 0
    assert float(zeros.float().mean()) == pytest.approx(0.2, abs=0.02)
    assert zeros.any(1).float().mean() > 0.9 and not zeros.all(1).any()  # scattered zeros, not whole rows
    d = FeatureDropout(0.2).eval()
    assert d(x) is x
    assert FeatureDropout(0.0)(x) is x
    with pytest.raises(ValueError):
        FeatureDropout(1.0)
    with pytest.raises(ValueError):
        FeatureDropout(0.2, mode="column")


def test_split_views_inverts_the_collate_order() -> None:
    b, sw, n, d = 2, 3, 4, 5
    rand = torch.arange(b * sw * d, dtype=torch.float32).reshape(b, sw, d)
    base = -torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)
    z = torch.cat([rand.reshape(b * sw, d), base.reshape(b * n, d)])
    r, s = split_views(z, b, sw, n)
    assert torch.equal(r, rand) and torch.equal(s, base)
    with pytest.raises(ValueError):
        split_views(z[:-1], b, sw, n)


def test_heads_learn_the_position_task_on_a_tiny_encoder() -> None:
    """A step of the whole SSL pipeline (crops -> shared encoder -> student/teacher projectors -> loss -> EMA) runs,
    and a few dozen steps on one structured volume lift the pretext accuracy above chance (1/9)."""
    torch.manual_seed(0)
    import numpy as np

    x, y, z = np.meshgrid(*(np.linspace(0, 1, s) for s in (24, 24, 8)), indexing="ij")
    vol = (np.sin(7 * x) * np.cos(5 * y) + x * y + 0.1 * z).astype(np.float32)
    encoder = nn.Sequential(
        nn.Conv3d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
    )
    student, ema = Projector(16, 64, 64), EMA(Projector(16, 64, 64), 0.9)
    drop = FeatureDropout(0.2)
    opt = torch.optim.AdamW([*encoder.parameters(), *student.parameters()], lr=3e-3)
    rng = np.random.default_rng(0)
    accs = []
    for _ in range(60):
        batch = collate_views(
            [sample_voco_views(vol, 3, 8, 4, rng, augment={"flip_p": 0.0, "rot90_p": 0.0}) for _ in range(2)]
        )
        emb = encoder(torch.cat([batch["rand"], batch["base"]]))
        s_rand, s_base = split_views(student(drop(emb)), 2, 4, 9)
        t_rand, t_base = split_views(ema(emb), 2, 4, 9)
        out = voco_loss(s_rand, s_base, t_rand, t_base, batch["labels"])
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        ema.update(student)
        accs.append(pretext_accuracy(out["sim"], batch["labels"]).item())
    assert all(np.isfinite(accs))
    # seeds 0-3 gave first-15 / last-15 means of 0.24-0.32 / 0.39-0.58 (ties at r = 8 put the floor above 1/9)
    assert np.mean(accs[-15:]) > 0.35 and np.mean(accs[-15:]) > np.mean(accs[:15]) + 0.1
