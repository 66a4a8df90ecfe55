"""MedContext (SPEC 6): joint supervised + masked-context self-distillation during fine-tuning.

L = DiceCE(Y, F_s) + DiceCE(Y, F_s^M) + beta * consistency(F_s^M, F_t)

* F_s: student logits on the clean crop; F_s^M: student logits on the masked crop; F_t: teacher logits on the clean
  crop (no gradient). The teacher has the student's architecture, starts as a copy and follows it as an EMA whose
  momentum rises from ``momentum`` (0.996) to 1 on a cosine schedule over the global step.
* Masking: the in-plane (x, y) grid of token cubes (``cube`` voxels, default 16) is sampled per volume; a fraction
  ``ratio`` (0.4) of the cells is masked, the same in-plane mask repeated along depth (z). The masked cells' tokens are
  replaced by a learnable mask token at the patch embedding (SwinUNETR: ``swinViT.patch_embed``, the paper's form; CNN
  backbones: the output of their first convolution, which embeds every voxel), and the masked view reaches every
  encoder input: modules that read the raw image besides the patch embedding (SwinUNETR's ``encoder1``, which the
  released code leaves unmasked) get the image with the masked cubes replaced by a learnable input token.
* ``loss_form: paper``: ||F_s^M - F_t||^2 / ||F_t||^2 per volume, averaged over the batch.
  ``loss_form: reference``: mean((F_s^M - F_t)^2) / ||F_t|| (what the released code computes: the MSE divided by the
  unsquared norm).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """EMA momentum at ``step``: ``base`` at step 0 rising to ``final`` at ``total_steps`` on a half cosine."""
    if total_steps <= 0:
        return final
    t = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * t) + 1.0) / 2.0


def block_mask(
    batch: int,
    spatial: tuple[int, int, int],
    cube: int = 16,
    ratio: float = 0.4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random token-cube mask, the same in-plane pattern repeated along depth.

    Args:
        batch: number of volumes N (each gets its own pattern).
        spatial: crop size (X, Y, Z) in voxels.
        cube: token cube side in voxels; the in-plane grid has ceil(X/cube) x ceil(Y/cube) cells.
        ratio: fraction of cells masked (rounded to the nearest count, at least one cell when ratio > 0).

    Returns:
        Bool tensor (N, X, Y, Z), True where masked.
    """
    x, y, z = spatial
    gx, gy = math.ceil(x / cube), math.ceil(y / cube)
    cells = gx * gy
    k = min(cells, max(1 if ratio > 0 else 0, round(ratio * cells)))
    scores = torch.rand(batch, cells, generator=generator)
    idx = scores.argsort(dim=1)[:, :k]
    grid = torch.zeros(batch, cells, dtype=torch.bool)
    grid.scatter_(1, idx, True)
    grid = grid.view(batch, gx, gy)
    vox = grid.repeat_interleave(cube, dim=1).repeat_interleave(cube, dim=2)[:, :x, :y]
    return vox[..., None].expand(batch, x, y, z).contiguous().to(device)


def blend_token(features: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Replace masked positions of a feature map by a learnable token.

    Args:
        features: (N, C, X', Y', Z').
        mask: bool (N, X, Y, Z) at voxel resolution; resized to (X', Y', Z') by nearest neighbour.
        token: (C,) learnable values.

    Returns:
        (N, C, X', Y', Z') with ``token`` where the (resized) mask is True.
    """
    m = mask[:, None].float()
    if m.shape[2:] != features.shape[2:]:
        m = F.interpolate(m, size=features.shape[2:], mode="nearest")
    m = m.to(features.dtype)
    return features * (1.0 - m) + token.view(1, -1, 1, 1, 1).to(features.dtype) * m


#: Per backbone: the layer whose output tokens are masked (the patch embedding; for CNNs the first convolution, which
#: embeds every voxel) and the other modules that read the raw input (SwinUNETR's encoder1 skip connection).
TOKEN_LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("swinViT.patch_embed", ("encoder1",)),  # SwinUNETR
    ("stem", ()),  # cnn_small
    ("conv_0", ()),  # MONAI BasicUNet
    ("convInit", ()),  # MONAI SegResNet
)


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def token_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """(token layer, modules that also read the raw input) of a known backbone, else None."""
    inner = getattr(model, "net", model)
    for path, raw in TOKEN_LAYERS:
        layer = _module(inner, path)
        if layer is not None:
            return layer, [m for m in (_module(inner, r) for r in raw) if m is not None]
    return None


def _out_channels(layer: nn.Module) -> int:
    dim = getattr(layer, "embed_dim", None)
    if dim is None:
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv3d)]
        if not convs:
            raise ValueError(f"cannot tell the token width of {type(layer).__name__}")
        dim = convs[0].out_channels
    return int(dim)


class MaskToken(nn.Module):
    """The learnable mask tokens and how the masked view enters the model.

    ``level == "token"`` (every backbone in :data:`TOKEN_LAYERS`): the outputs of the patch embedding (SwinUNETR) or of
    the first convolution (CNNs) at masked positions are replaced by ``token`` (one value per channel), and every other
    module that reads the raw input (SwinUNETR's ``encoder1``) gets the masked input instead of the clean one: voxels of
    the masked cubes replaced by ``input_token`` (one value per input channel). ``level == "input"`` (unknown
    backbones): only the input is masked.
    """

    def __init__(self, model: nn.Module, in_channels: int = 1) -> None:
        super().__init__()
        found = token_layers(model)
        self.level = "token" if found is not None else "input"
        self.input_token = nn.Parameter(torch.zeros(in_channels))
        nn.init.normal_(self.input_token, std=0.02)
        if found is not None:
            self.token = nn.Parameter(torch.zeros(_out_channels(found[0])))
            nn.init.normal_(self.token, std=0.02)
        else:
            self.token = self.input_token

    @contextlib.contextmanager
    def masked(self, model: nn.Module, mask: torch.Tensor) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """Context yielding ``prepare(x)``: the input to feed ``model`` so that its forward sees the masked view.

        Args:
            mask: bool (N, X, Y, Z) at voxel resolution (:func:`block_mask`).
        """
        if self.level == "input":
            yield lambda x: blend_token(x, mask, self.input_token)
            return
        layer, raw_readers = token_layers(model)  # type: ignore[misc]

        def tokens(_module, _inputs, output):
            return blend_token(output, mask, self.token)

        def raw_input(_module, args):
            return (blend_token(args[0], mask, self.input_token), *args[1:])

        handles = [layer.register_forward_hook(tokens)]
        handles += [m.register_forward_pre_hook(raw_input) for m in raw_readers]
        try:
            yield lambda x: x
        finally:
            for h in handles:
                h.remove()


class EmaTeacher:
    """A frozen copy of the student updated as theta_t <- m * theta_t + (1 - m) * theta_s (buffers copied)."""

    def __init__(self, student: nn.Module) -> None:
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        for pt, ps in zip(self.model.parameters(), student.parameters(), strict=True):
            pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)
        for bt, bs in zip(self.model.buffers(), student.buffers(), strict=True):
            bt.copy_(bs)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def consistency_loss(student_masked: torch.Tensor, teacher: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Masked-student vs teacher consistency.

    Args:
        student_masked: (N, K, X, Y, Z) student logits on the masked view.
        teacher: (N, K, X, Y, Z) teacher logits on the clean view (detached here).
        form: ``paper`` (squared error over squared norm, per volume, batch mean) or ``reference``.

    Returns:
        Scalar tensor.
    """
    t = teacher.detach().float()
    s = student_masked.float()
    if form == "paper":
        num = (s - t).pow(2).flatten(1).sum(1)
        den = t.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        return (num / den).mean()
    if form == "reference":
        return F.mse_loss(s, t) / t.norm().clamp_min(1e-12)
    raise ValueError(f"medcontext loss_form must be 'paper' or 'reference', not {form!r}")


def medcontext_losses(
    model: nn.Module,
    teacher: EmaTeacher,
    token: MaskToken,
    x: torch.Tensor,
    y: torch.Tensor,
    seg_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    beta: float = 0.5,
    form: str = "paper",
) -> dict[str, torch.Tensor]:
    """One MedContext objective evaluation.

    Args:
        model: the student (train mode).
        x: (N, C, X, Y, Z) crops; y: (N, 1, X, Y, Z) integer labels.
        mask: bool (N, X, Y, Z) from :func:`block_mask`.

    Returns:
        ``{"clean", "masked", "consistency", "total"}`` scalar tensors (``total`` carries the gradient).
    """
    logits = model(x)
    with token.masked(model, mask) as prepare:
        logits_m = model(prepare(x))
    with torch.no_grad():
        t_logits = teacher.model(x)
    clean = seg_loss(logits, y)
    masked = seg_loss(logits_m, y)
    cons = consistency_loss(logits_m, t_logits, form)
    return {"clean": clean, "masked": masked, "consistency": cons, "total": clean + masked + beta * cons}
