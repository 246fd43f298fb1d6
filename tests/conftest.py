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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
