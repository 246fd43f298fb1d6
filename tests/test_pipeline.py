"""End-to-end parity with diffusers' pipelines on identical tiny weights, and argument checking."""
from __future__ import annotations

import pytest
import torch

from conftest import diffusers_twin, rel_err, tiny_pipe

PROMPT, NEG = "a photo of an astronaut riding a horse, highly detailed", "blurry, low quality"


def _diffusers_latents(dpipe, sampler_cls="EulerDiscreteScheduler", **kw):
    import diffusers

    dpipe.scheduler = getattr(diffusers, sampler_cls).from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    return dpipe(PROMPT, negative_prompt=NEG, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **kw).images


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21_v", "tiny-sdxl"])
def test_txt2img_euler_matches_diffusers(preset, tmp_path):
    pipe = tiny_pipe(preset)
    ours = pipe(PROMPT, negative_prompt=NEG, guidance_scale=7.5, steps=10, seed=0, sampler="euler",
                height=64, width=64, output="latent", progress=False)
    theirs = _diffusers_latents(diffusers_twin(pipe, tmp_path / "d"))
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


def test_encode_prompt_matches_diffusers(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    dpipe = diffusers_twin(pipe, tmp_path / "d")
    cond, uncond = pipe.encode_prompt(PROMPT, NEG)
    pe, ne = dpipe.encode_prompt(PROMPT, "cpu", 1, True, NEG)
    assert (cond.context - pe).abs().max() < 1e-4
    assert (uncond.context - ne).abs().max() < 1e-4


def test_images_and_batches():
    pipe = tiny_pipe("tiny-sd15")
    imgs = pipe(["a cat", "a dog"], steps=2, num_images=2, seed=3, progress=False)
    assert len(imgs) == 4 and imgs[0].size == (64, 64)
    assert "Seed: 3" in imgs[0].info["parameters"] and "Steps: 2" in imgs[0].info["parameters"]
    a = pipe("a cat", steps=2, seed=3, output="latent", progress=False)
    b = pipe("a cat", steps=2, seed=3, output="latent", progress=False)
    c = pipe("a cat", steps=2, seed=4, output="latent", progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw, name", [
    (dict(steps=0), "steps"), (dict(height=60), "height"), (dict(width=12), "width"),
    (dict(sampler="nope"), "sampler"), (dict(num_images=0), "num_images"), (dict(output="jpg"), "output"),
    (dict(timestep_spacing="odd"), "timestep_spacing"),
])
def test_bad_arguments_name_the_argument(kw, name):
    pipe = tiny_pipe("tiny-sd15")
    with pytest.raises(ValueError, match=name):
        pipe("x", **kw)
