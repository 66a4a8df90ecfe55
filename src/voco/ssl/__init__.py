"""VoCo self-supervision: crop geometry and position labels, losses, projector / EMA heads (SPEC 2)."""

from voco.ssl.crops import (
    DEFAULT_REGION_WEIGHTS,
    CropAugment,
    collate_views,
    position_labels,
    region_balanced_indices,
    sample_voco_views,
)
from voco.ssl.heads import EMA, FeatureDropout, Projector, split_views, stat_free_batchnorm
from voco.ssl.losses import (
    prediction_loss,
    pretext_accuracy,
    regularization_loss,
    relu_cosine,
    voco_loss,
    voco_v1_loss,
)

__all__ = [
    "DEFAULT_REGION_WEIGHTS",
    "EMA",
    "CropAugment",
    "FeatureDropout",
    "Projector",
    "collate_views",
    "position_labels",
    "prediction_loss",
    "pretext_accuracy",
    "region_balanced_indices",
    "regularization_loss",
    "relu_cosine",
    "sample_voco_views",
    "split_views",
    "stat_free_batchnorm",
    "voco_loss",
    "voco_v1_loss",
]
