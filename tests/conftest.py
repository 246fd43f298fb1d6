"""Shared fixtures: tiny seeded models, and the same weights inside diffusers (the oracle)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import latentdiff

LAYOUTS = Path(__file__).parent / "layouts"  # copies of shared/reference/checkpoint-layouts/*.json


def layout(name: str) -> dict[str, tuple[list[int], str]]:
    return json.loads((LAYOUTS / f"{name}.json").read_text())


def perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Add seeded noise to every parameter so zero-initialised layers (out convs, biases) are not trivially
    equal in both implementations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def tiny_pipe(preset: str | latentdiff.ModelConfig, seed: int = 0) -> latentdiff.Pipeline:
    pipe = latentdiff.from_config(preset, seed=seed)
    for i, m in enumerate((pipe.unet, pipe.vae, pipe.text_encoders)):
        perturb(m, seed + i)
    return pipe


def diffusers_twin(pipe: latentdiff.Pipeline, folder: Path):
    """The same weights as a diffusers pipeline, through our folder writer and diffusers' own loader."""
    import diffusers

    pipe.save(folder, format="diffusers")
    return diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)


def unet_inputs(u, pooled_dim: int = 0, refiner: bool = False):
    """Seeded U-Net inputs for config u (16x16 latents, 2 samples, 7 context tokens): (x, t, context, y) for ours
    and the added_cond_kwargs diffusers' UNet2DConditionModel takes for SDXL-like models."""
    from latentdiff.models.unet import sdxl_vector, size_numbers

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, u.in_channels, 16, 16, generator=g)
    t = torch.tensor([999.0, 453.67])
    context = torch.randn(2, 7, u.context_dim, generator=g)
    if not u.adm_in_channels:
        return (x, t, context, None), {}
    pooled = torch.randn(2, pooled_dim, generator=g)
    time_ids = (torch.tensor([size_numbers(1024, 768, refiner=True), size_numbers(512, 640, True, 2.5)]) if refiner
                else torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 640.0, 512.0]]))
    y = sdxl_vector(pooled, time_ids, u.adm_in_channels)
    return (x, t, context, y), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def twin_pair(preset: str, tmp_path_factory):
    """(our tiny pipeline, its diffusers twin, the twin's scheduler config) for a module-scoped fixture."""
    pipe = tiny_pipe(preset)
    dpipe = diffusers_twin(pipe, tmp_path_factory.mktemp("folder") / "d")
    dpipe.set_progress_bar_config(disable=True)
    return pipe, dpipe, dict(dpipe.scheduler.config)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
