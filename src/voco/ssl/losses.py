"""VoCo losses (SPEC 2): pure tensor functions, float64-safe, no module state.

Shapes: B volumes per step, sw random crops per volume, n = g*g base crops, D projector width.

Gradient flow of the default (``loss_form="spec"``, the reference code):

* ``pred``: P = ReLU-cos(student random crops of v, teacher base crops of v); only the student random crops get a
  gradient (teacher tensors are detached here whatever the caller passes).
* ``inter``: target T = ReLU-cos(teacher random of v, teacher base of u) (no gradient), prediction
  S = ReLU-cos(student random of v, student base of u), u = (v + 1) mod B; gradient reaches both student sides of S.
* ``reg``: mean over pairs k < l of ReLU-cos(b_k, stopgrad(b_l))^2 on the student base crops of v.

``loss_form="paper"`` swaps in the paper's formulas (TPAMI Eqs. 4, 5, 8) with the same gradient routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6
LOSS_FORMS = ("spec", "paper")


def relu_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ReLU of the cosine similarity of every row of ``a`` with every row of ``b``.

    Args:
        a: ``(..., m, d)``.
        b: ``(..., n, d)`` (leading dims broadcast with ``a``'s).
        eps: lower bound on each row's norm (zero rows give similarity 0).

    Returns:
        ``(..., m, n)`` values in [0, 1]; no temperature, no softmax.
    """
    return torch.relu(F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).transpose(-1, -2))


def _per_volume(x: torch.Tensor) -> torch.Tensor:
    """Mean over the leading (volume) dims of a per-volume loss; a scalar stays a scalar."""
    return x.mean() if x.ndim > 0 else x


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS, neg: str = "log") -> torch.Tensor:
    """The reference's pos + neg position loss (SPEC 2), one value per volume, averaged over volumes.

    L_pos = -sum(y * log(1 - |y - P| + eps)) / (sum(y) + eps);
    L_neg = -sum([y == 0] * log(1 - P + eps)) / (#[y == 0] + eps)   (``neg="log"``, method ``voco``), or
    L_neg = sum([y == 0] * P^2) / (#[y == 0] + eps)                  (``neg="square"``, method ``voco-v1``).

    Args:
        pred: P, ``(sw, n)`` or ``(B, sw, n)``, values in [0, 1].
        target: y, same shape, values in [0, 1] (detached here: a target never gets a gradient).
        eps: 1e-6 as the reference.
        neg: ``log`` or ``square``.

    Returns:
        scalar L_pos + L_neg (mean over B for 3-D input).
    """
    pos, negl = prediction_terms(pred, target, eps=eps, neg=neg)
    return pos + negl


def prediction_terms(
    pred: torch.Tensor, target: torch.Tensor, eps: float = EPS, neg: str = "log"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_pos, L_neg)`` of ``prediction_loss`` separately (each a scalar, mean over volumes)."""
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise ValueError(
            f"prediction_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal "
            "(sw, n) or (B, sw, n)"
        )
    y = target.detach().to(pred.dtype)
    dims = (-2, -1)
    pos = -(y * torch.log(1 - (y - pred).abs() + eps)).sum(dims) / (y.sum(dims) + eps)
    mask = (y == 0).to(pred.dtype)
    if neg == "log":
        negl = -(mask * torch.log(1 - pred + eps)).sum(dims) / (mask.sum(dims) + eps)
    elif neg == "square":
        negl = (mask * pred.pow(2)).sum(dims) / (mask.sum(dims) + eps)
    else:
        raise ValueError(f"prediction_loss: neg must be 'log' or 'square', got {neg!r}")
    return _per_volume(pos), _per_volume(negl)


def paper_prediction_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """TPAMI Eq. 4 / 8: -mean(log(1 - |y - s| + eps)) over the (sw, n) entries, averaged over volumes."""
    if pred.shape != target.shape:
        raise ValueError(f"paper_prediction_loss: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    y = target.detach().to(pred.dtype)
    per = -torch.log(1 - (y - pred).abs() + eps).mean((-2, -1))
    return _per_volume(per)


def _pair_similarities(bases: torch.Tensor) -> torch.Tensor:
    """``(..., n(n-1)/2)`` ReLU-cos(b_k, stopgrad(b_l)) for k < l."""
    n = bases.shape[-2]
    if n < 2:
        raise ValueError(f"regularization_loss needs at least 2 base crops, got {n}")
    sim = relu_cosine(bases, bases.detach())
    k, l_ = torch.triu_indices(n, n, offset=1, device=bases.device)
    return sim[..., k, l_]


def regularization_loss(bases: torch.Tensor, form: str = "spec") -> torch.Tensor:
    """Base-crop discrepancy loss on student base projections.

    Args:
        bases: ``(n, d)`` or ``(B, n, d)``.
        form: ``spec`` - mean over k < l of ReLU-cos(b_k, stopgrad(b_l))^2 (the reference);
            ``paper`` - 2/(n(n-1)) sum_{k<l} |s_kl| (TPAMI Eq. 5; same stop-gradient).

    Returns:
        scalar (mean over B for 3-D input).
    """
    s = _pair_similarities(bases)
    if form == "spec":
        per = s.pow(2).mean(-1)
    elif form == "paper":
        per = s.abs().mean(-1)
    else:
        raise ValueError(f"regularization_loss: form must be one of {LOSS_FORMS}, got {form!r}")
    return _per_volume(per)


def _check_views(student_rand, student_base, teacher_rand, teacher_base, labels) -> tuple[int, int, int]:
    if student_rand.ndim != 3 or student_base.ndim != 3:
        raise ValueError(
            "voco_loss: student_rand must be (B, sw, D) and student_base (B, n, D), got "
            f"{tuple(student_rand.shape)} and {tuple(student_base.shape)}"
        )
    b, sw, d = student_rand.shape
    n = student_base.shape[1]
    expect = {"student_base": (b, n, d), "teacher_rand": (b, sw, d), "teacher_base": (b, n, d), "labels": (b, sw, n)}
    got = {"student_base": student_base, "teacher_rand": teacher_rand, "teacher_base": teacher_base, "labels": labels}
    for name, shape in expect.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"voco_loss: {name} has shape {tuple(got[name].shape)}, expected {shape}")
    return b, sw, n


def voco_loss(
    student_rand: torch.Tensor,
    student_base: torch.Tensor,
    teacher_rand: torch.Tensor,
    teacher_base: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_form: str = "spec",
    w_pred: float = 1.0,
    w_inter: float = 1.0,
    w_reg: float = 1.0,
    eps: float = EPS,
) -> dict[str, torch.Tensor]:
    """VoCo (TPAMI) self-supervised loss L_SSL = w_pred L_pred + w_inter L_inter + w_reg L_reg (SPEC 2).

    Args:
        student_rand: ``(B, sw, D)`` student projections of the random crops (after feature dropout).
        student_base: ``(B, n, D)`` student projections of the base crops.
        teacher_rand: ``(B, sw, D)`` teacher projections of the random crops (detached here).
        teacher_base: ``(B, n, D)`` teacher projections of the base crops (detached here).
        labels: ``(B, sw, n)`` overlap position labels.
        loss_form: ``spec`` (reference code, default) or ``paper`` (TPAMI Eqs. 4, 5, 8).
        w_pred, w_inter, w_reg: term weights (all 1 by default).
        eps: 1e-6.

    Returns:
        dict of scalars ``pred``, ``inter``, ``reg``, ``total`` (each term is the mean over the B volumes; ``total`` is
        the weighted sum), plus ``sim`` = detached P ``(B, sw, n)`` for ``pretext_accuracy``.
    """
    if loss_form not in LOSS_FORMS:
        raise ValueError(f"voco_loss: loss_form must be one of {LOSS_FORMS}, got {loss_form!r}")
    _check_views(student_rand, student_base, teacher_rand, teacher_base, labels)
    t_rand, t_base = teacher_rand.detach(), teacher_base.detach()
    p = relu_cosine(student_rand, t_base)  # (B, sw, n): gradient to the student random crops only
    # partner volume u = (v + 1) mod B (u = v when B = 1)
    t_inter = relu_cosine(t_rand, torch.roll(t_base, shifts=-1, dims=0))
    s_inter = relu_cosine(student_rand, torch.roll(student_base, shifts=-1, dims=0))
    if loss_form == "spec":
        pred = prediction_loss(p, labels, eps=eps)
        inter = prediction_loss(s_inter, t_inter, eps=eps)
    else:
        pred = paper_prediction_loss(p, labels, eps=eps)
        inter = paper_prediction_loss(s_inter, t_inter, eps=eps)
    reg = regularization_loss(student_base, form=loss_form)
    total = w_pred * pred + w_inter * inter + w_reg * reg
    return {"pred": pred, "inter": inter, "reg": reg, "total": total, "sim": p.detach()}


def voco_v1_loss(
    student_rand: torch.Tensor,
    student_base: torch.Tensor,
    teacher_rand: torch.Tensor,
    teacher_base: torch.Tensor,
    labels: torch.Tensor,
    *,
    symmetric: bool = True,
    w_pred: float = 1.0,
    w_reg: float = 1.0,
    eps: float = EPS,
) -> dict[str, torch.Tensor]:
    """VoCo-v1 (CVPR 2024) loss L = L_pos + L_neg' + L_reg, no inter-volume term (SPEC 2, method ``voco-v1``).

    The teacher is an EMA of the whole network. P = ReLU-cos(student random, teacher base); with ``symmetric`` (the
    v1 reference code) P = (ReLU-cos(student random, teacher base) + ReLU-cos(teacher random, student base)) / 2, so the
    student base crops also get a gradient through P. L_neg' = mean of P^2 over zero-label entries.

    Shapes as ``voco_loss``. Returns dict of scalars ``pos``, ``neg``, ``pred`` (= pos + neg), ``inter`` (0),
    ``reg``, ``total``, plus ``sim`` = detached P.
    """
    _check_views(student_rand, student_base, teacher_rand, teacher_base, labels)
    t_rand, t_base = teacher_rand.detach(), teacher_base.detach()
    p = relu_cosine(student_rand, t_base)
    if symmetric:
        p = 0.5 * (p + relu_cosine(t_rand, student_base))
    pos, neg = prediction_terms(p, labels, eps=eps, neg="square")
    reg = regularization_loss(student_base, form="spec")
    pred = pos + neg
    total = w_pred * pred + w_reg * reg
    return {
        "pos": pos,
        "neg": neg,
        "pred": pred,
        "inter": torch.zeros_like(pred),
        "reg": reg,
        "total": total,
        "sim": p.detach(),
    }


@torch.no_grad()
def pretext_accuracy(pred_sim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of random crops whose predicted position (argmax_k P) is a true position (argmax_k y).

    A tie in y (a crop straddling base crops equally) counts any of the tied maxima as correct; chance is 1/g^2.

    Args:
        pred_sim: ``(..., n)`` predicted overlaps P.
        labels: ``(..., n)`` true overlaps y.

    Returns:
        scalar float tensor in [0, 1].
    """
    if pred_sim.shape != labels.shape:
        raise ValueError(f"pretext_accuracy: shapes differ: {tuple(pred_sim.shape)} vs {tuple(labels.shape)}")
    y = labels.to(torch.float64)
    hit = y.gather(-1, pred_sim.argmax(-1, keepdim=True)).squeeze(-1)
    return (hit >= y.amax(-1) - 1e-9).to(torch.float32).mean()
