"""CUDA parity with diffusers in fp16 / bf16 on the tiny models (issue #29.5). Marked `gpu` and skipped without
CUDA; `benchmarks/gpu_check.sh` runs them (`pytest -m gpu`).

Half precision cannot match diffusers bit for bit (kernels pick their own summation order), so each check is
relative: latentdiff in a dtype on the GPU is no farther from the fp32 CPU result than diffusers in the same dtype
on the same GPU (plus a small slack), and the two are close to each other.
"""
from __future__ import annotations

import pytest
import torch

from conftest import diffusers_twin, tiny_pipe
from latentdiff import speed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT, NEG = "a photo of an astronaut riding a horse, highly detailed", "blurry, low quality"
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def _ours(pipe, **kw):
    return pipe(PROMPT, negative_prompt=NEG, guidance_scale=7.5, steps=8, seed=0, sampler="euler", height=64,
                width=64, output="latent", progress=False, **kw)


def _theirs(dpipe):
    import diffusers

    dpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    return dpipe(PROMPT, negative_prompt=NEG, num_inference_steps=8, guidance_scale=7.5, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("dtype", sorted(HALF))
@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_txt2img_on_cuda_as_close_to_fp32_as_diffusers(preset, dtype, tmp_path):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    pipe = tiny_pipe(preset)
    dpipe = diffusers_twin(pipe, tmp_path / "d")
    ref = _ours(pipe)  # fp32 on the CPU: the exact path, equal to diffusers' fp32 (tests/test_pipeline.py)
    pipe.to("cuda", HALF[dtype])
    dpipe.to("cuda", HALF[dtype])
    ours, theirs = _ours(pipe), _theirs(dpipe)
    assert ours.device.type == "cuda" and ours.shape == theirs.shape == ref.shape
    assert torch.isfinite(ours).all()
    assert not any(p.is_mkldnn for p in pipe.unet.parameters())  # conv packing is for the CPU only
    e_ours, e_theirs = _rel_l2(ours, ref), _rel_l2(theirs, ref)
    assert e_ours <= 1.5 * e_theirs + 1e-3, (e_ours, e_theirs)
    assert _rel_l2(ours, theirs) <= 2e-2, _rel_l2(ours, theirs)


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_vae_decode_on_cuda_as_close_to_fp32_as_diffusers(dtype, tmp_path):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    pipe = tiny_pipe("tiny-sd15")
    dpipe = diffusers_twin(pipe, tmp_path / "d")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = pipe.vae.decode(z)
        ours = pipe.vae.to("cuda", HALF[dtype]).decode(z.to("cuda", HALF[dtype]))
        theirs = dpipe.vae.to("cuda", HALF[dtype]).decode(z.to("cuda", HALF[dtype])).sample
    e_ours, e_theirs = _rel_l2(ours, ref), _rel_l2(theirs, ref)
    assert e_ours <= 1.5 * e_theirs + 1e-3, (e_ours, e_theirs)


def test_default_dtype_on_cuda_and_keep_text_encoders():
    """load()'s default on a GPU: bf16 where the GPU has it; keep_text_encoders=False frees them there too."""
    assert speed.default_dtype("cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    pipe = tiny_pipe("tiny-sd15").to("cuda", speed.default_dtype("cuda"))
    before = torch.cuda.memory_allocated()
    out = _ours(pipe, keep_text_encoders=False)
    assert torch.isfinite(out).all() and speed.text_encoders_released(pipe.text_encoders)
    assert torch.cuda.memory_allocated() < before  # the encoders' weights left the GPU
