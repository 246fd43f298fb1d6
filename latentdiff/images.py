"""Images in and out of the pipeline: PIL <-> tensors, resizing, grids, and PNGs with A1111's `parameters` text
chunk, written so an image can be re-created and read back:

    a red apple, studio light
    Negative prompt: blurry
    Steps: 20, Sampler: euler_a, Schedule type: karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: x

Tensors are (B, 3, H, W) RGB in [-1, 1] (what the VAE takes and gives) and masks (B, 1, H, W) in [0, 1].
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from .sampling import samplers, schedules


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


# A1111 labels -> ours (from the sampler table), so PNGs from A1111 / Forge / ComfyUI exports can be re-created too
_FROM_A1111 = {row.a1111: name for name, row in samplers.SAMPLERS.items()}


def format_parameters(p: dict, model: str) -> str:
    prompt = p["prompt"] if isinstance(p["prompt"], str) else " | ".join(p["prompt"])
    fields = [("Steps", p["steps"]), ("Sampler", p["sampler"]), ("Schedule type", p["schedule"]),
              ("CFG scale", p["guidance_scale"]), ("Seed", p["seed"]), ("Size", f"{p['width']}x{p['height']}")]
    if "strength" in p:
        fields.append(("Denoising strength", p["strength"]))
    if "eta" in p:
        fields.append(("Eta", p["eta"]))
    fields.append(("Model", model))
    if p.get("lora_hashes"):  # A1111's entry: Lora hashes: "name: 0123456789ab, other: ..."
        fields.append(("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in p["lora_hashes"].items()) + '"'))
    for i, entry in enumerate(p.get("controlnets", ())):  # A1111 ControlNet extension: ControlNet 0: "Module: ..."
        fields.append((f"ControlNet {i}", f'"{entry}"'))
    return f"{prompt}\nNegative prompt: {p['negative_prompt']}\n" + ", ".join(f"{k}: {v}" for k, v in fields)


# one "Key: value" of the last line; a value may be quoted and hold commas (A1111's re_param, infotext_utils.py)
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """The text chunk -> keyword arguments for Pipeline.__call__ (prompt included)."""
    lines = text.strip().split("\n")
    if len(lines) < 2 or not lines[-1].startswith("Steps:"):
        raise ValueError("PNG 'parameters' text has no 'Steps: ...' line; not an A1111-style parameters chunk")
    fields = {m[1]: m[2] for m in _FIELD.finditer(lines[-1])}
    body = lines[:-1]
    neg = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    prompt = "\n".join(body[: neg[0]] if neg else body)
    out = {"prompt": prompt, "steps": int(fields["Steps"])}
    if neg:
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
    if "Sampler" in fields:
        # our own names (what format_parameters writes) pass through, as does anything unknown, which the
        # pipeline's argument check then rejects by name
        out["sampler"] = _FROM_A1111.get(fields["Sampler"], fields["Sampler"])
    if fields.get("Schedule type", "").lower() in schedules.SCHEDULES:
        out["schedule"] = fields["Schedule type"].lower()
    if "CFG scale" in fields:
        out["guidance_scale"] = float(fields["CFG scale"])
    if "Seed" in fields:
        out["seed"] = int(fields["Seed"])
    if "Eta" in fields:
        out["eta"] = float(fields["Eta"])
    if "Size" in fields:
        w, h = fields["Size"].split("x")
        out["width"], out["height"] = int(w), int(h)
    return out


def read_png_parameters(path: str | Path) -> dict:
    with Image.open(path) as im:
        text = im.info.get("parameters")
    if text is None:
        raise ValueError(f"{path} has no 'parameters' text chunk")
    return parse_parameters(text)
