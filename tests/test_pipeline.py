"""End-to-end parity with diffusers' pipelines on identical tiny weights, and argument checking."""
from __future__ import annotations

import numpy as np
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
    cond = pipe.encode_prompt(PROMPT, NEG)
    pe, ne = dpipe.encode_prompt(PROMPT, "cpu", 1, True, NEG)
    assert (cond.context - pe).abs().max() < 1e-4
    assert (cond.uncond_context - ne).abs().max() < 1e-4


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


def _test_image(seed=0, size=64):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((size, size), Image.BILINEAR)


def _mask(size=64):
    from PIL import Image

    m = Image.new("L", (size, size), 0)
    m.paste(255, (0, 0, size // 2, size))  # repaint the left half
    return m


@pytest.mark.parametrize("sampler, cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler")])
def test_img2img_matches_diffusers(sampler, cls, tmp_path):
    import diffusers

    pipe = tiny_pipe("tiny-sd15")
    pipe.save(tmp_path / "d", format="diffusers")
    dpipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    dpipe.scheduler = getattr(diffusers, cls).from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    img = _test_image()
    ours = pipe.img2img(PROMPT, img, strength=0.6, negative_prompt=NEG, steps=10, seed=0, sampler=sampler,
                        output="latent", progress=False)
    theirs = dpipe(PROMPT, image=img, strength=0.6, negative_prompt=NEG, num_inference_steps=10, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_9_channel_matches_diffusers(strength, tmp_path):
    import diffusers

    pipe = tiny_pipe("tiny-sd15-inpaint")
    assert pipe.unet.input_blocks[0][0].weight.shape[1] == 9
    pipe.save(tmp_path / "d", format="diffusers")
    dpipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    dpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    img, mask = _test_image(1), _mask()
    ours = pipe.inpaint(PROMPT, img, mask, strength=strength, negative_prompt=NEG, steps=10, seed=0,
                        output="latent", progress=False)
    theirs = dpipe(PROMPT, image=img, mask_image=mask, strength=strength, negative_prompt=NEG, num_inference_steps=10,
                   guidance_scale=7.5, height=64, width=64, generator=torch.Generator("cpu").manual_seed(0),
                   output_type="latent").images
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


def test_inpaint_regular_checkpoint_keeps_the_known_region():
    pipe = tiny_pipe("tiny-sd15")
    img, mask = _test_image(2), _mask()
    out = pipe.inpaint(PROMPT, img, mask, steps=6, seed=0, output="latent", progress=False)
    gen = torch.Generator("cpu").manual_seed(0)
    x0 = pipe._encode_image(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None] / 127.5 - 1, gen)
    keep = (slice(None), slice(None), slice(None), slice(4, 8))  # right half of the 8x8 latent is kept
    assert torch.allclose(out[keep], x0[keep], atol=1e-5)
    assert not torch.allclose(out[..., :4], x0[..., :4], atol=1e-2)


def test_image_argument_errors():
    pipe = tiny_pipe("tiny-sd15")
    img = _test_image()
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img("x", img, strength=1.5)
    with pytest.raises(ValueError, match="mask size"):
        pipe.inpaint("x", img, _mask(32))
    with pytest.raises(ValueError, match="image"):
        pipe.img2img("x", "not an image")


def test_long_prompt_uses_every_chunk_and_callback_sees_every_step():
    pipe = tiny_pipe("tiny-sd15")
    first75 = " ".join(["red"] * 75)
    words = first75 + " " + " ".join(["blue"] * 125)  # one token per word: 200 tokens
    assert len(pipe.tokenizer.encode(words)) == 200
    cond = pipe.encode_prompt(words)
    assert cond.context.shape[1] == 3 * 77
    seen = []
    long = pipe(words, steps=3, seed=0, output="latent", progress=False,
                callback=lambda i, sigma, x: seen.append((i, float(sigma), tuple(x.shape))))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 8, 8)
    short = pipe(first75, steps=3, seed=0, output="latent", progress=False)
    assert (long - short).abs().max() > 1e-3


def test_offload_gives_the_same_latents_and_leaves_models_on_cpu():
    pipe = tiny_pipe("tiny-sd15")
    a = pipe("a cat", steps=2, seed=1, output="latent", progress=False)
    pipe.enable_offload()
    b = pipe("a dog", steps=2, seed=1, output="latent", progress=False)  # a new prompt: the encoders must run
    c = pipe("a cat", steps=2, seed=1, output="latent", progress=False)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert all(p.device.type == "cpu" for m in (pipe.unet, pipe.vae, pipe.text_encoders) for p in m.parameters())


def test_tiled_decode_kicks_in_above_the_threshold():
    pipe = tiny_pipe("tiny-sd15")
    z = torch.randn(1, 4, 24, 24) * 3
    whole = pipe.decode(z)[0]
    pipe.tile_decode_above = 16
    calls = []
    orig = pipe.vae.tiled_decode
    pipe.vae.tiled_decode = lambda z, **kw: calls.append(z.shape) or orig(z, tile=16, overlap=8)
    tiled = pipe.decode(z)[0]
    import numpy as np

    assert calls and np.abs(np.asarray(whole, float) - np.asarray(tiled, float)).mean() < 8


@pytest.mark.parametrize("sampler, cls", [("euler", "EulerDiscreteScheduler"),
                                          ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_zero_terminal_snr_model_matches_diffusers(sampler, cls, tmp_path):
    """A v-prediction model trained with zero terminal SNR samples on the rescaled schedule, as diffusers does
    with rescale_betas_zero_snr (which our folder writer sets), and the flag survives both file formats."""
    from dataclasses import replace

    import latentdiff
    from latentdiff.config import get_preset

    pipe = tiny_pipe(replace(get_preset("tiny-sd21_v"), zero_terminal_snr=True))
    assert pipe.alphas_cumprod[-1] == 0
    ours = pipe(PROMPT, negative_prompt=NEG, guidance_scale=7.5, steps=10, seed=0, sampler=sampler,
                height=64, width=64, output="latent", progress=False)
    dpipe = diffusers_twin(pipe, tmp_path / "d")
    assert dpipe.scheduler.config.rescale_betas_zero_snr
    theirs = _diffusers_latents(dpipe, cls)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)
    plain = latentdiff.Pipeline(replace(pipe.cfg, zero_terminal_snr=False), pipe.unet, pipe.vae, pipe.text_encoders)
    assert rel_err(plain(PROMPT, negative_prompt=NEG, guidance_scale=7.5, steps=10, seed=0, sampler=sampler,
                         height=64, width=64, output="latent", progress=False), theirs) > 1e-2
    pipe.save(tmp_path / "m.safetensors")
    assert latentdiff.load(tmp_path / "m.safetensors", dtype=torch.float32).cfg.zero_terminal_snr
    assert latentdiff.load(tmp_path / "d", dtype=torch.float32).cfg.zero_terminal_snr
