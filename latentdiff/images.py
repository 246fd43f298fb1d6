"""Images in and out of the pipeline: PIL <-> tensors, resizing, grids, and PNGs with A1111's parameters chunk.

Tensors are (B, 3, H, W) RGB in [-1, 1] (what the VAE takes and gives) and masks (B, 1, H, W) in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin


def to_tensor(image, name: str, gray: bool = False) -> torch.Tensor:
    """PIL image or tensor -> float (B, C, H, W); RGB in [-1, 1], or a gray mask in [0, 1]. `name` is the argument
    named in the error."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)
        t = t[None, None] if gray else t.permute(2, 0, 1)[None]
        return t if gray else t * 2 - 1
    if isinstance(image, torch.Tensor):
        t = image.float()
        t = t[None] if t.ndim == 3 else t[None, None] if t.ndim == 2 else t
        if t.ndim != 4 or t.shape[1] != (1 if gray else 3):
            raise ValueError(f"{name} tensor must be ({'1' if gray else '3'}, H, W) or (B, C, H, W), "
                             f"got {tuple(image.shape)}")
        return t
    raise ValueError(f"{name} must be a PIL image or a torch tensor, got {type(image).__name__}")


def resize(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear with antialiasing (as diffusers' image processor resizes PIL inputs); a no-op at the same size."""
    return t if t.shape[-2:] == (h, w) else F.interpolate(t, size=(h, w), mode="bilinear", antialias=True)


def to_pil(img: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 PIL images."""
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image: Image.Image, path: str | Path) -> None:
    """Save with the A1111 `parameters` text chunk, if the image carries one."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    image.save(path, pnginfo=info)
