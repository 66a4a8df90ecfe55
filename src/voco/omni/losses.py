"""Supervised losses for omni / SuPreM pre-training (pure tensor functions).

* :func:`dice_ce` — softmax DiceCE, one-hot targets, background excluded from Dice (MONAI ``DiceCELoss`` with
  ``include_background=False, to_onehot_y=True, softmax=True``). With a per-sample ``class_mask`` it becomes the
  *marginal* DiceCE for partial labels: the probabilities of classes a sample's source does not annotate are merged
  into background (the source calls them background), and Dice runs over the annotated foreground classes only.
  With an all-true mask it equals the plain loss.
* :func:`sigmoid_dice_bce` — SuPreM's per-class sigmoid loss (Dice over the classes present + BCE), restricted to the
  classes each sample's source annotates (SPEC 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def _target_index(target: torch.Tensor, n: int) -> torch.Tensor:
    """(N, 1, *S) or (N, *S) integer labels -> (N, *S) long."""
    if target.dim() == n + 1 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_mask: torch.Tensor | None = None,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> torch.Tensor:
    """Softmax DiceCE with background excluded from Dice; marginal over unannotated classes.

    Args:
        logits: (N, C, *S) raw network outputs.
        target: (N, 1, *S) or (N, *S) integer labels in [0, C).
        class_mask: optional bool (N, C): True where the sample's source annotates the class (channel 0 is
            background and counts as annotated). None = every class annotated.

    Returns:
        scalar loss = lambda_dice * mean Dice loss over (sample, annotated foreground class) + lambda_ce * CE.
    """
    n, c = logits.shape[:2]
    tgt = _target_index(target, logits.dim() - 1)
    if class_mask is None:
        class_mask = torch.ones(n, c, dtype=torch.bool, device=logits.device)
    class_mask = class_mask.to(device=logits.device, dtype=torch.bool).clone()
    class_mask[:, 0] = True
    shape = (n, c) + (1,) * (logits.dim() - 2)
    merged = (~class_mask).clone()
    merged[:, 0] = True  # channels that make up "background" for this sample
    logits32 = logits.float()
    log_all = torch.logsumexp(logits32, dim=1)  # (N, *S)
    neg_inf = torch.finfo(logits32.dtype).min
    log_bg = torch.logsumexp(logits32.masked_fill(~merged.view(shape), neg_inf), dim=1) - log_all
    log_p = logits32 - log_all.unsqueeze(1)  # (N, C, *S)
    # A target on a class the source does not annotate cannot occur; treat it as background to be safe.
    tgt = torch.where(class_mask.gather(1, tgt.flatten(1)).view_as(tgt), tgt, torch.zeros_like(tgt))
    log_pt = torch.where(tgt == 0, log_bg, log_p.gather(1, tgt.unsqueeze(1)).squeeze(1))
    ce = -log_pt.mean()

    probs = log_p.exp()
    onehot = F.one_hot(tgt, c).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dl = 1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)  # (N, C)
    valid = class_mask.clone()
    valid[:, 0] = False
    dice = dl[valid].mean() if bool(valid.any()) else dl.sum() * 0.0
    return lambda_dice * dice + lambda_ce * ce


def sigmoid_dice_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SuPreM loss: per-class sigmoid, Dice over the classes present + BCE, on annotated classes only.

    Args:
        logits: (N, K, *S): channel k is foreground class k + 1 (no background channel).
        target: (N, 1, *S) or (N, *S) integer labels in [0, K] (0 = background).
        class_mask: optional bool (N, K + 1) in label space (channel 0 ignored) or (N, K): which classes the
            sample's source annotates. None = all.

    Returns:
        scalar: mean BCE over annotated channels + mean Dice loss over (sample, annotated class present in it).
    """
    n, k = logits.shape[:2]
    tgt = _target_index(target, logits.dim() - 1)
    if class_mask is None:
        mask = torch.ones(n, k, dtype=torch.bool, device=logits.device)
    else:
        mask = class_mask.to(device=logits.device, dtype=torch.bool)
        if mask.shape[1] == k + 1:
            mask = mask[:, 1:]
    onehot = F.one_hot(tgt, k + 1).movedim(-1, 1)[:, 1:].float()  # (N, K, *S)
    x = logits.float()
    dims = tuple(range(2, logits.dim()))
    bce_map = F.binary_cross_entropy_with_logits(x, onehot, reduction="none").mean(dims)  # (N, K)
    if not bool(mask.any()):
        return x.sum() * 0.0
    bce = bce_map[mask].mean()
    prob = torch.sigmoid(x)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dl = 1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)
    present = mask & (onehot.sum(dims) > 0)
    dice = dl[present].mean() if bool(present.any()) else x.sum() * 0.0
    return bce + dice
