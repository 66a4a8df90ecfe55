"""Backbones (SwinUNETR B/L/H, U-Net, SegResNet, a small CNN) with the VoCo embedding, and weight transfer."""

from voco.models.factory import MIN_SIDE, MODEL_NAMES, build_model, decoder_parameter_names, freeze_decoder
from voco.models.transfer import TransferReport, extract_state_dict, load_pretrained, read_checkpoint, strip_prefixes

__all__ = [
    "MIN_SIDE",
    "MODEL_NAMES",
    "TransferReport",
    "build_model",
    "decoder_parameter_names",
    "extract_state_dict",
    "freeze_decoder",
    "load_pretrained",
    "read_checkpoint",
    "strip_prefixes",
]
