"""SwinUNETR backbone (MONAI, current API) with the VoCo embedding (SPEC 2).

Parameter names are exactly MONAI's ``SwinUNETR`` attribute names (``swinViT.*``, ``encoder1..4``, ``encoder10``,
``decoder5..1``, ``out``), so released VoCo / SuPreM SwinUNETR weights load by name and ours load in their code.
"""

from __future__ import annotations

import torch
from monai.networks.nets import SwinUNETR

from voco.models.common import pool_concat
from voco.models.window_attention import WINDOW_ATTENTION_IMPLS, set_window_attention

SWIN_SIZES = {"B": 48, "L": 96, "H": 192}


class VocoSwinUNETR(SwinUNETR):
    """MONAI SwinUNETR (v2 blocks) plus ``embed``: the 24F-dimensional pooled-encoder embedding.

    Args:
        in_channels: input channels.
        out_channels: segmentation classes K.
        feature_size: F (48 = Swin-B, 96 = Swin-L, 192 = Swin-H).
        use_checkpoint: gradient checkpointing in the Swin stages.
        use_v2: SwinUNETR-v2 residual conv blocks (the VoCo reference uses them).
        window_attention: ``efficient`` (default: ``voco.models.window_attention``, same maths and parameters, keeps
            no per-window attention matrices) or ``monai`` (MONAI's own ``WindowAttention.forward``).
    """

    #: prefixes of parameters that ``embed`` does not use (frozen during SSL so DDP needs no unused-parameter search)
    decoder_prefixes = ("decoder5.", "decoder4.", "decoder3.", "decoder2.", "decoder1.", "out.")

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        feature_size: int = 48,
        use_checkpoint: bool = False,
        use_v2: bool = True,
        window_attention: str = "efficient",
        **kwargs,
    ) -> None:
        if window_attention not in WINDOW_ATTENTION_IMPLS:
            raise ValueError(
                f"window_attention {window_attention!r} unknown; choose from {', '.join(WINDOW_ATTENTION_IMPLS)}"
            )
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=feature_size,
            use_checkpoint=use_checkpoint,
            use_v2=use_v2,
            **kwargs,
        )
        self.feature_size = feature_size
        self.embed_dim = 24 * feature_size
        self.window_attention = window_attention
        set_window_attention(self, window_attention)

    def encoder_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder maps encoder1(x), encoder2(h0), encoder3(h1), encoder4(h2), encoder10(h4).

        Args:
            x: (N, C, X, Y, Z), sides multiples of 32.
        Returns:
            maps with F, F, 2F, 4F, 16F channels.
        """
        hidden = self.swinViT(x, self.normalize)
        return [
            self.encoder1(x),
            self.encoder2(hidden[0]),
            self.encoder3(hidden[1]),
            self.encoder4(hidden[2]),
            self.encoder10(hidden[4]),
        ]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated global average pools of the encoder maps: (N, C, X, Y, Z) -> (N, 24F)."""
        return pool_concat(self.encoder_maps(x))
