"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's encoder (time / label embedding, input_blocks, middle_block) that also sees a
control image ("hint"), and one zero-initialised 1x1 conv per skip connection and after the middle block. Its
outputs are added to the frozen U-Net's skips and middle-block output (models/unet.py, ``control=``).

Module paths equal the keys under ``control_model.`` of lllyasviel's released files (cldm/cldm.py ``ControlNet``):

    time_embed.{0,2}, [label_emb.0.{0,2} for SDXL]   as in the U-Net
    input_hint_block.{0,2,...}    conv 3x3 (SiLU between): hint (B, 3, H, W) -> (B, C0, H/8, W/8); every second
                                  conv of the middle ones has stride 2; the last one is zero-initialised
    input_blocks.N                the U-Net's encoder; the hint embedding is added after input_blocks.0 (conv_in)
    zero_convs.N.0                1x1 conv per input block -> the residual for skip N
    middle_block, middle_block_out.0   the middle block and its 1x1 conv -> the residual for the middle block
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from latentdiff.config import UNetConfig, _build
from latentdiff.models.layers import timestep_embedding
from latentdiff.models.unet import encoder, middle_block


@dataclass(frozen=True)
class ControlNetConfig:
    # the encoder copy: only the fields the encoder uses matter (out_channels and output depths do not)
    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3  # RGB control image in [0, 1]
    # widths of the hint encoder's conv pairs (cldm: 16, 32, 96, 256; diffusers' conditioning_embedding_out_channels)
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    # SDXL: width of the pooled text embedding inside y (diffusers' config stores the rest, the Fourier width,
    # on its own); 0 for SD 1.x / 2.x
    pooled_dim: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(s: str) -> "ControlNetConfig":
        d = json.loads(s)
        return ControlNetConfig(unet=_build(UNetConfig, d.get("unet", {})), hint_channels=d.get("hint_channels", 3),
                                hint_widths=tuple(d.get("hint_widths", (16, 32, 96, 256))),
                                pooled_dim=d.get("pooled_dim", 0))


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        mc = u.model_channels
        emb_dim = mc * 4

        def zero_conv(ch: int) -> nn.Sequential:
            return nn.Sequential(_zero(nn.Conv2d(ch, ch, 1)))

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if u.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(u.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        w = cfg.hint_widths
        hint = [nn.Conv2d(cfg.hint_channels, w[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(w[:-1], w[1:]):
            hint += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*hint, _zero(nn.Conv2d(w[-1], mc, 3, padding=1)))

        # the U-Net's encoder, block for block (models/unet.py)
        self.input_blocks, chans = encoder(u)
        self.zero_convs = nn.ModuleList([zero_conv(c) for c in chans])  # one per encoder block's output
        if u.middle_block:
            self.middle_block = middle_block(u, chans[-1])
            self.middle_block_out = zero_conv(chans[-1])

    @property
    def hint_factor(self) -> int:
        """Pixel-to-latent factor of the hint encoder: 2 per stride-2 conv (8 for every released ControlNet)."""
        return 2 ** (len(self.cfg.hint_widths) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """x (B, in_channels, h, w) as the U-Net gets it; hint (B, 3, h*f, w*f) in [0, 1], f = hint_factor.
        Returns (one residual per input block, as the U-Net's skips: (B, C_n, h_n, w_n); the middle-block
        residual (B, C_mid, h_mid, w_mid), None without a middle block), unscaled."""
        u = self.cfg.unet
        if (y is not None) != bool(u.adm_in_channels):
            raise ValueError(f"ControlNet: y must be given exactly when adm_in_channels > 0 "
                             f"(adm_in_channels={u.adm_in_channels}, y given: {y is not None})")
        if hint.shape[-2:] != (x.shape[-2] * self.hint_factor, x.shape[-1] * self.hint_factor):
            raise ValueError(f"ControlNet: hint {tuple(hint.shape[-2:])} must be {self.hint_factor} x the latent "
                             f"size {tuple(x.shape[-2:])}")
        t = timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps
        emb = self.time_embed(timestep_embedding(t, u.model_channels).to(x.dtype))  # (B, 4*C0)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        h = self.input_blocks[0](x, emb, context) + self.input_hint_block(hint.to(x.dtype))  # (B, C0, h, w)
        outs = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            outs.append(zero_conv(h))
        if not u.middle_block:
            return outs, None
        return outs, self.middle_block_out(self.middle_block(h, emb, context))
