"""VoCo heads (SPEC 2): projector MLP, EMA teacher, feature dropout, view splitting.

The projector's attribute names (``layer1.0.weight`` ...) follow the reference's ``projection_head`` so that the
``student.*`` / ``teacher.*`` tensors of released VoCo checkpoints map by name.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DROPOUT_MODES = ("row", "element")


def stat_free_batchnorm(num_features: int) -> nn.BatchNorm1d:
    """BatchNorm1d without affine parameters and without running statistics: always normalises with the batch's own
    statistics (train and eval alike); has no parameters and no buffers."""
    return nn.BatchNorm1d(num_features, affine=False, track_running_stats=False)


class Projector(nn.Module):
    """Linear(in, h) -> BN -> ReLU -> Linear(h, h) -> BN -> ReLU -> Linear(h, out), BN affine- and statistics-free.

    Args:
        in_dim: embedding width (24F for SwinUNETR: 1152 at F = 48).
        hidden_dim: 1024 (``voco``) / 2048 (``voco-v1``).
        out_dim: 1024 (``voco``) / 2048 (``voco-v1``).

    Shapes: ``(N, in_dim) -> (N, out_dim)``; N >= 2 in training (batch statistics).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden_dim), stat_free_batchnorm(hidden_dim), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), stat_free_batchnorm(hidden_dim), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(x)))


class FeatureDropout(nn.Module):
    """The reference's "feature augmentation": dropout on an ``(N, D)`` embedding matrix.

    ``mode="row"`` (default, what the reference's 1-D dropout does to an N x D matrix) zeroes whole rows (crops) with
    probability p; ``mode="element"`` zeroes single entries. Kept values are scaled by 1/(1-p). Identity in eval mode.
    """

    def __init__(self, p: float = 0.2, mode: str = "row") -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"feature dropout p must be in [0, 1), got {p}")
        if mode not in DROPOUT_MODES:
            raise ValueError(f"feature dropout mode must be one of {DROPOUT_MODES}, got {mode!r}")
        self.p, self.mode = float(p), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mode == "element":
            return nn.functional.dropout(x, self.p, training=True)
        keep = torch.rand(x.shape[:-1] + (1,), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class EMA:
    """Exponential-moving-average teacher: theta_t <- m * theta_t + (1 - m) * theta_s after each student step.

    ``EMA(module)`` takes ``module`` itself as the teacher (SPEC 2: the VoCo teacher projector starts from its own random
    init); ``EMA.copy_of(student)`` starts the teacher as a deep copy of the student instead. The teacher never
    requires a gradient; calling the EMA runs the teacher under ``torch.no_grad``. Parameters are averaged; buffers
    (if any) are copied from the student. Parameters are matched by name (wrappers such as DDP are unwrapped).

    Args:
        module: the teacher module.
        momentum: m (0.9 in VoCo).
    """

    def __init__(self, module: nn.Module, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.module = _unwrap(module)
        self.momentum = float(momentum)
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @classmethod
    def copy_of(cls, student: nn.Module, momentum: float = 0.9) -> EMA:
        return cls(copy.deepcopy(_unwrap(student)), momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """One EMA step towards ``student`` (same architecture); ``momentum`` overrides m for this step only."""
        m = self.momentum if momentum is None else float(momentum)
        s_params = dict(_unwrap(student).named_parameters())
        t_params = dict(self.module.named_parameters())
        if s_params.keys() != t_params.keys():
            missing = sorted(set(t_params) ^ set(s_params))[:5]
            raise ValueError(f"EMA.update: student and teacher parameters differ (e.g. {missing})")
        for name, t in t_params.items():
            s = s_params[name].detach()
            if s.shape != t.shape:
                raise ValueError(
                    f"EMA.update: {name} has shape {tuple(s.shape)} in the student, {tuple(t.shape)} in the teacher"
                )
            t.mul_(m).add_(s.to(t.dtype), alpha=1.0 - m)
        s_bufs = dict(_unwrap(student).named_buffers())
        for name, t in self.module.named_buffers():
            if name in s_bufs:
                t.copy_(s_bufs[name])
        self.updates += 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def to(self, *args: Any, **kwargs: Any) -> EMA:
        self.module.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> EMA:
        self.module.train(mode)
        return self

    def eval(self) -> EMA:
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """``{"module": teacher state_dict, "momentum": m, "updates": count}`` (tensors only; weights-only loadable)."""
        return {"module": self.module.state_dict(), "momentum": self.momentum, "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.momentum = float(state.get("momentum", self.momentum))
        self.updates = int(state.get("updates", 0))


def split_views(z: torch.Tensor, batch: int, sw: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split projections of one step's concatenated inputs ``[rand (B*sw), base (B*n)]`` (``collate_views`` order).

    Args:
        z: ``(B*sw + B*n, D)``.

    Returns:
        ``(rand (B, sw, D), base (B, n, D))``.
    """
    if z.ndim != 2 or z.shape[0] != batch * (sw + n):
        raise ValueError(
            f"split_views: expected ({batch * (sw + n)}, D) for B={batch}, sw={sw}, n={n}, got {tuple(z.shape)}"
        )
    return z[: batch * sw].reshape(batch, sw, -1), z[batch * sw :].reshape(batch, n, -1)
