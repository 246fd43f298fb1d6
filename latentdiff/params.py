"""A1111's `parameters` PNG text chunk: write it so an image can be re-created, and read it back.

    a red apple, studio light
    Negative prompt: blurry
    Steps: 20, Sampler: euler_a, Schedule type: karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: x
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from .sampling import samplers, schedules

# A1111 labels -> ours (from the sampler table), so PNGs from A1111 / Forge / ComfyUI exports can be re-created too
_FROM_A1111 = {row.a1111: name for name, row in samplers.SAMPLERS.items()}


def format_parameters(p: dict, model: str) -> str:
    prompt = p["prompt"] if isinstance(p["prompt"], str) else " | ".join(p["prompt"])
    fields = [("Steps", p["steps"]), ("Sampler", p["sampler"]), ("Schedule type", p["schedule"]),
              ("CFG scale", p["guidance_scale"]), ("Seed", p["seed"]), ("Size", f"{p['width']}x{p['height']}")]
    if "strength" in p:
        fields.append(("Denoising strength", p["strength"]))
    fields.append(("Model", model))
    return f"{prompt}\nNegative prompt: {p['negative_prompt']}\n" + ", ".join(f"{k}: {v}" for k, v in fields)


def parse_parameters(text: str) -> dict:
    """The text chunk -> keyword arguments for Pipeline.__call__ (prompt included)."""
    lines = text.strip().split("\n")
    if len(lines) < 2 or not lines[-1].startswith("Steps:"):
        raise ValueError("PNG 'parameters' text has no 'Steps: ...' line; not an A1111-style parameters chunk")
    fields = dict(f.split(": ", 1) for f in lines[-1].split(", ") if ": " in f)
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
