"""Segmentation losses in plain torch (no MONAI import: ``voco finetune`` starts in torch's time, not MONAI's).

:class:`DiceCELoss` computes what ``monai.losses.DiceCELoss(include_background=..., to_onehot_y=True, softmax=True)``
computes with its other arguments at their defaults (``tests/test_losses.py`` checks value and gradient against MONAI).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: MONAI DiceLoss defaults: added to the numerator and the denominator of every Dice ratio
SMOOTH_NR = 1e-5
SMOOTH_DR = 1e-5


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, *S) integer labels -> (N, K, *S) float32 one-hot (MONAI's ``one_hot`` with its default dtype)."""
    shape = list(labels.shape)
    shape[1] = num_classes
    return torch.zeros(shape, dtype=torch.float32, device=labels.device).scatter_(1, labels.long(), 1.0)


class DiceCELoss(nn.Module):
    """Soft Dice (of the softmax against the one-hot labels) + cross-entropy (of the logits against the labels).

    ``forward(logits (N, K, *S), labels (N, 1, *S))`` -> a scalar:

    * Dice: for each case and class, ``1 - (2 |p . y| + 1e-5) / (|p| + |y| + 1e-5)`` over the spatial axes (a class
      absent from a case and predicted absent scores ~0), the mean over cases and classes; the background class (0)
      is left out unless ``include_background``;
    * CE: ``torch.nn.functional.cross_entropy`` of the logits with the integer labels, the mean over voxels, every
      class included.

    The loss is their sum (MONAI's ``lambda_dice = lambda_ce = 1``).
    """

    def __init__(self, include_background: bool = False) -> None:
        super().__init__()
        self.include_background = bool(include_background)

    def extra_repr(self) -> str:
        return f"include_background={self.include_background}"

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The Dice term (``target``: the (N, K, *S) one-hot labels)."""
        probs = torch.softmax(logits, 1)
        if not self.include_background:
            probs, target = probs[:, 1:], target[:, 1:]
        axes = list(range(2, probs.ndim))
        intersection = torch.sum(probs * target, dim=axes)
        # |p| + |y| written as 2 tp + fp + fn with fp = |p| - tp and fn = |y| - tp, MONAI's order of operations
        # (the result agrees with MONAI's to the last bit, not only to rounding)
        false_pos = torch.sum(probs, dim=axes) - intersection
        false_neg = torch.sum(target, dim=axes) - intersection
        numerator = 2 * intersection + SMOOTH_NR
        denominator = 2 * (intersection + 0.5 * false_pos + 0.5 * false_neg) + SMOOTH_DR
        return torch.mean(1 - numerator / denominator)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim != labels.ndim or labels.shape[1] != 1:
            raise ValueError(f"expected logits (N, K, *S) and labels (N, 1, *S), got shapes {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")
        n_classes = logits.shape[1]
        if n_classes < 2:
            raise ValueError(f"DiceCELoss needs at least 2 classes (background and one more), got {n_classes}")
        dice = self.dice(logits, one_hot(labels, n_classes))
        ce = F.cross_entropy(logits, labels[:, 0].long())
        return dice + ce
