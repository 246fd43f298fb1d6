"""A tiny preview decoder: latents -> a rough image, for cheap progress previews (issue #7).

Trained by us (latentdiff/train/preview.py) to imitate one model's own VAE decoder on that VAE's latents; it is
stored next to the model as `<name>.preview.safetensors` and used by `Pipeline.preview`.

Shapes: latents (B, C, h, w) as the sampler holds them (scaled by the VAE's scaling factor) -> (B, 3, f*h, f*w)
in about [-1, 1], f = 2 ** upsamples (the VAE's own factor). Plain convs and ReLUs, `width` channels throughout:
no norms, no attention, so it costs a few percent of the VAE decoder it imitates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

SUFFIX = ".preview.safetensors"  # a model's preview decoder lies next to it: emoji.preview.safetensors


def preview_path(model_path) -> Path:
    """Where the preview decoder of the single file `model_path` lies (x.safetensors -> x.preview.safetensors)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + SUFFIX)


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

    def forward(self, z):
        return self.layers(z)  # not clamped: training sees the raw error; Pipeline.preview clamps


def save_preview(model: PreviewDecoder, path, extra: dict[str, str] | None = None) -> None:
    """fp16 weights and the config in the metadata, as Pipeline.load_preview reads them."""
    from ..weights import write_safetensors

    meta = {**model.cfg.to_metadata(), "format": "latentdiff-preview", **(extra or {})}
    write_safetensors(path, {k: v.half().contiguous() for k, v in model.state_dict().items()}, meta)
