"""Seeded LoRA / LyCORIS files for tests, named from the diffusers oracle's (or our) module names, and reference
merges written out from the formulas, independent of latentdiff.adapters."""
from __future__ import annotations

import torch
from torch import nn

from latentdiff.adapters.names import kohya_names


def linear_and_convs(model: nn.Module, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """{module path: weight} of every Linear / Conv2d of `model` whose path passes `keep`."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and keep(n)}


def unet_locon_modules(unet: nn.Module) -> dict[str, torch.Tensor]:
    """What kohya's LoCon targets in a diffusers U-Net: transformer children, resnets, down / upsamplers."""
    return linear_and_convs(unet, lambda n: any(s in n for s in (".attentions.", ".resnets.", "samplers.")))


def te_modules(te: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder layers' Linears (kohya's targets: not text_projection) under transformers CLIP names with the
    `text_model.` prefix kohya writes (transformers 5's CLIPTextModel lacks it)."""
    return {(n if n.startswith("text_model.") else "text_model." + n): w
            for n, w in linear_and_convs(te, lambda n: "encoder.layers." in n).items()}


def lora_factors(w: torch.Tensor, rank: int, g: torch.Generator, std: float = 0.1):
    """(down, up): (r, in[, kh, kw]) and (out, r[, 1, 1]), LoCon shapes for a conv."""
    down = torch.randn(rank, *w.shape[1:], generator=g) * std
    up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * std
    return down, up


def kohya(modules: dict[str, torch.Tensor], prefix: str, g: torch.Generator, rank=4, alpha=2.0) -> dict:
    """kohya keys for {module path: weight}; rank and alpha may be callables of the path (alpha None: no key)."""
    sd = {}
    for name, w in modules.items():
        r = rank(name) if callable(rank) else rank
        a = alpha(name) if callable(alpha) else alpha
        stem = prefix + name.replace(".", "_")
        sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = lora_factors(w, r, g)
        if a is not None:
            sd[stem + ".alpha"] = torch.tensor(float(a))
    return sd


def lora_delta(down: torch.Tensor, up: torch.Tensor, shape) -> torch.Tensor:
    """kohya merge_to: up @ down, the conv case flattened (equal to the conv2d form, wave2-formats 1.4)."""
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


@torch.no_grad()
def add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """W += delta for {module path: delta} of `model` (delta already scaled, in W's shape)."""
    for name, d in deltas.items():
        model.get_submodule(name).weight += d


def kohya_deltas(sd: dict, modules: dict[str, torch.Tensor], prefix: str, m: float) -> dict[str, torch.Tensor]:
    """The reference merge of a kohya file: m * alpha / r * up @ down; no alpha (or 0) means scale 1."""
    out = {}
    for name, w in modules.items():
        stem = prefix + name.replace(".", "_")
        down, up = sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"]
        a = float(sd.get(stem + ".alpha", 0.0))
        scale = a / down.shape[0] if a else 1.0
        out[name] = m * scale * lora_delta(down, up, w.shape)
    return out


def state(*modules: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Deep copies of state dicts, to compare with torch.equal later."""
    return [{k: v.detach().clone() for k, v in mod.state_dict().items()} for mod in modules]


def same_state(before: list[dict], *modules: nn.Module) -> bool:
    return all(b.keys() == (sd := mod.state_dict()).keys() and all(torch.equal(v, sd[k]) for k, v in b.items())
               for b, mod in zip(before, modules))


def ours_kohya(pipe, keep, seed, **kw) -> dict:
    """A kohya file for our model, named through kohya_names (the writer's side of the table)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for t, name in kohya_names(pipe.unet, pipe.text_encoders).items():
        if keep(t):
            w = (pipe.unet if t.part == "unet" else pipe.text_encoders[int(t.part[-1])]).get_parameter(t.weight)
            mods[name] = w[t.rows[0]:t.rows[1]] if t.rows else w
    return kohya(mods, "", g, **kw)
