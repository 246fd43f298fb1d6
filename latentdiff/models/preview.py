"""A tiny preview decoder: latents -> a rough image, for cheap progress previews (issue #7).

Trained by us (latentdiff/train/preview.py) to imitate one model's own VAE decoder on that VAE's latents; it is
stored next to the model as `<name>.preview.safetensors` and used by `Pipeline.preview`.

Shapes: latents (B, C, h, w) as the sampler holds them (scaled by the VAE's scaling factor) -> (B, 3, f*h, f*w)
in about [-1, 1], f = 2 ** upsamples (the VAE's own factor). Plain convs and ReLUs, `width` channels throughout:
no norms, no attention, so it costs a few percent of the VAE decoder it imitates.

For released SD checkpoints, which have no such file, `weights/preview.py` also reads TAESD's released decoders
(`TAESDDecoder`), the tiny decoders ComfyUI and A1111 use for their previews.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PreviewConfig:
    latent_channels: int = 4
    upsamples: int = 2  # the VAE's downsampling factor is 2 ** upsamples
    width: int = 32

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @staticmethod
    def from_metadata(meta: dict[str, str]) -> PreviewConfig:
        return PreviewConfig(**{k: int(meta[k]) for k in ("latent_channels", "upsamples", "width")})


class PreviewDecoder(nn.Module):
    def __init__(self, cfg: PreviewConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers = [nn.Conv2d(cfg.latent_channels, w, 3, padding=1), nn.ReLU()]
        for _ in range(cfg.upsamples):  # each level: (B, width, h, w) -> (B, width, 2h, 2w)
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"),
                       nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(w, 3, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    @property
    def latent_channels(self) -> int:  # as TAESDDecoder's: what Pipeline.load_preview checks
        return self.cfg.latent_channels

    def forward(self, z):
        return self.layers(z)  # not clamped: training sees the raw error; Pipeline.preview clamps


class _Clamp(nn.Module):
    def forward(self, z):
        return torch.tanh(z / 3) * 3  # TAESD's soft clamp of the latents to +-3


class _TAESDBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + x)  # the released decoders' blocks keep their width: the skip is identity


class TAESDDecoder(nn.Sequential):
    """The decoder of TAESD (github.com/madebyollin/taesd, MIT), a distilled SD / SDXL VAE decoder released as
    `taesd_decoder.safetensors` / `taesdxl_decoder.safetensors`; a Sequential, so its indices are the released
    keys ("1.weight", "3.conv.0.weight", ..., "19.weight"). Latents as the sampler holds them (B, C, h, w) ->
    (B, 3, 8h, 8w) in about [-1, 1] (TAESD itself outputs [0, 1])."""

    def __init__(self, latent_channels: int = 4, width: int = 64):
        layers = [_Clamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(3):  # three times: 3 blocks, 2x nearest upsample, conv without bias
            layers += [_TAESDBlock(width) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1, bias=False)]
        layers += [_TAESDBlock(width), nn.Conv2d(width, 3, 3, padding=1)]
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def forward(self, z):
        return super().forward(z) * 2 - 1
