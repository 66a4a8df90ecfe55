"""``build_model``: one entry point for every backbone the pipeline trains."""

from __future__ import annotations

from torch import nn

from voco.errors import ConfigError
from voco.shapes import FEATURE_SIZES, MIN_SIDE, MODEL_NAMES, WINDOW_ATTENTION_IMPLS

__all__ = ["FEATURE_SIZES", "MIN_SIDE", "MODEL_NAMES", "WINDOW_ATTENTION_IMPLS", "build_model",
           "decoder_parameter_names", "feature_size_for", "freeze_decoder"]


def feature_size_for(name: str, size: str = "B", feature_size: int | None = None) -> int:
    if name not in FEATURE_SIZES:
        raise ConfigError(f"model.name {name!r} unknown; choose from {', '.join(MODEL_NAMES)}")
    if feature_size is not None:
        return int(feature_size)
    if size not in FEATURE_SIZES[name]:
        raise ConfigError(f"model.size {size!r} unknown; choose from {', '.join(FEATURE_SIZES[name])}")
    return FEATURE_SIZES[name][size]


def build_model(
    name: str,
    in_channels: int = 1,
    out_channels: int = 2,
    size: str = "B",
    feature_size: int | None = None,
    window_attention: str | None = None,
    **kwargs,
) -> nn.Module:
    """Build a segmentation backbone with ``forward(x) -> (N, K, X, Y, Z)``, ``embed(x) -> (N, D)``, ``embed_dim``.

    Args:
        name: ``swinunetr`` | ``unet`` | ``segresnet`` | ``cnn_small``.
        in_channels: input channels C.
        out_channels: output classes K.
        size: ``B`` | ``L`` | ``H`` (SwinUNETR feature size 48 / 96 / 192).
        feature_size: explicit F (overrides ``size``).
        window_attention: SwinUNETR only (other models ignore it): ``efficient`` (default; same maths and parameters
            as MONAI, no per-window attention matrices kept) or ``monai`` (MONAI's own attention).
        kwargs: passed to the model (e.g. ``use_checkpoint=True`` for SwinUNETR).
    Raises:
        ConfigError: unknown name, size or window attention.
    """
    f = feature_size_for(name, size, feature_size)
    if window_attention is not None and window_attention not in WINDOW_ATTENTION_IMPLS:
        raise ConfigError(
            f"model.window_attention {window_attention!r} unknown; choose from {', '.join(WINDOW_ATTENTION_IMPLS)}"
        )
    # MONAI is imported only for the models that need it (cnn_small is plain torch: fast CLI / worker start-up)
    if name == "swinunetr":
        from voco.models.swin import VocoSwinUNETR

        if window_attention is not None:
            kwargs["window_attention"] = window_attention
        model: nn.Module = VocoSwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=f, **kwargs)
    elif name == "unet":
        from voco.models.cnn import VocoBasicUNet

        model = VocoBasicUNet(in_channels=in_channels, out_channels=out_channels, feature_size=f, **kwargs)
    elif name == "segresnet":
        from voco.models.cnn import VocoSegResNet

        model = VocoSegResNet(in_channels=in_channels, out_channels=out_channels, feature_size=f, **kwargs)
    else:
        from voco.models.small import CnnSmall

        model = CnnSmall(in_channels=in_channels, out_channels=out_channels, feature_size=f, **kwargs)
    model.model_name = name  # type: ignore[assignment]
    return model


def decoder_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters that ``model.embed`` does not use (decoder and output layer)."""
    prefixes = tuple(getattr(model, "decoder_prefixes", ()))
    return [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]


def freeze_decoder(model: nn.Module) -> int:
    """Set ``requires_grad=False`` on the decoder parameters (SSL trains the encoder only); returns how many."""
    names = set(decoder_parameter_names(model))
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return len(names)
