"""The SDXL refiner (#26.2): bigG-only conditioning with the aesthetic score, its files both ways, and the base +
refiner handoff (`denoising_end` / `denoising_start`) against diffusers' StableDiffusionXLPipeline +
StableDiffusionXLImg2ImgPipeline, on tiny seeded stand-ins (tiny-sdxl, tiny-sdxl-refiner)."""
from __future__ import annotations

import pytest
import torch

import latentdiff
from conftest import diffusers_twin, rel_err, tiny_pipe

diffusers = pytest.importorskip("diffusers")
PROMPT, NEG = "a lighthouse on a cliff at dusk", "fog"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, refiner = tiny_pipe("tiny-sdxl"), tiny_pipe("tiny-sdxl-refiner", seed=10)
    root = tmp_path_factory.mktemp("folders")
    dbase, dref = diffusers_twin(base, root / "base"), diffusers_twin(refiner, root / "refiner")
    for d in (dbase, dref):
        d.set_progress_bar_config(disable=True)
    return base, refiner, dbase, dref, root


def _gen():
    return torch.Generator("cpu").manual_seed(0)


def test_refiner_folder_is_diffusers_img2img_with_aesthetic_score(pair):
    _, refiner, _, dref, root = pair
    assert type(dref).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert dref.text_encoder is None and dref.config.requires_aesthetics_score
    assert not dref.config.force_zeros_for_empty_prompt  # as the released refiner: the empty negative is encoded
    back = latentdiff.load(root / "refiner", dtype=torch.float32)
    assert back.cfg.family == "sdxl_refiner" and back.cfg.unet == refiner.cfg.unet
    for ours, theirs in ((refiner.unet, back.unet), (refiner.text_encoders, back.text_encoders)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if "logit_scale" not in k)  # logit_scale: no place in a folder


def test_refiner_single_file_round_trip_needs_no_config(pair, tmp_path):
    _, refiner, *_ = pair
    refiner.save(tmp_path / "r.safetensors")
    back = latentdiff.load(tmp_path / "r.safetensors", dtype=torch.float32)
    assert back.cfg.family == "sdxl_refiner" and back.cfg.unet == refiner.cfg.unet
    a, b = refiner.unet.state_dict(), back.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scores", [(6.0, 2.5), (7.5, 1.0)])
def test_refiner_img2img_matches_diffusers(pair, scores):
    # pixel image in, strength 0.6: the aesthetic score (cond) and negative score (uncond) enter label_emb
    _, refiner, _, dref, _ = pair
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    theirs = dref(PROMPT, image=(image + 1) / 2, negative_prompt=NEG, strength=0.6, num_inference_steps=10,
                  guidance_scale=5.0, aesthetic_score=scores[0], negative_aesthetic_score=scores[1],
                  generator=_gen(), output_type="latent").images
    ours = refiner.img2img(PROMPT, image, negative_prompt=NEG, strength=0.6, steps=10, guidance_scale=5.0,
                           aesthetic_score=scores[0], negative_aesthetic_score=scores[1], sampler="euler",
                           output="latent", progress=False)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


@pytest.mark.parametrize("sampler, cls", [("euler", "EulerDiscreteScheduler"),
                                          ("euler_a", "EulerAncestralDiscreteScheduler")])
def test_base_refiner_handoff_matches_diffusers(pair, sampler, cls):
    base, refiner, dbase, dref, _ = pair
    for d in (dbase, dref):
        d.scheduler = getattr(diffusers, cls).from_config(d.scheduler.config)
    kw = dict(num_inference_steps=10, guidance_scale=6.0, generator=_gen(), output_type="latent")
    handed = dbase(PROMPT, height=64, width=64, denoising_end=0.8, **kw).images
    theirs = dref(PROMPT, image=handed, denoising_start=0.8, **{**kw, "generator": _gen()}).images
    ours_handed = base(PROMPT, steps=10, guidance_scale=6.0, sampler=sampler, height=64, width=64,
                       denoising_end=0.8, output="latent", progress=False)
    assert rel_err(ours_handed, handed) < 1e-3, rel_err(ours_handed, handed)
    ours = refiner.img2img(PROMPT, ours_handed, denoising_start=0.8, steps=10, guidance_scale=6.0,
                           sampler=sampler, output="latent", progress=False)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)
    # the handoff is not a no-op: the refiner changed the still-noisy latents, and the base stopped early
    assert rel_err(ours, ours_handed) > 1e-2
    full = base(PROMPT, steps=10, guidance_scale=6.0, sampler=sampler, output="latent", progress=False)
    assert rel_err(ours_handed, full) > 1e-2


def test_handoff_bad_arguments(pair):
    base, refiner, *_ = pair
    with pytest.raises(ValueError, match="denoising_start continues a denoising_end run"):
        refiner.img2img(PROMPT, torch.zeros(1, 3, 64, 64), denoising_start=0.8, steps=4, progress=False)
    with pytest.raises(ValueError, match=r"denoising_start / denoising_end must be in \(0, 1\)"):
        base(PROMPT, steps=4, denoising_end=1.5, output="latent", progress=False)
    with pytest.raises(ValueError, match="leave no step to run"):
        refiner.img2img(PROMPT, torch.zeros(1, 4, 8, 8), denoising_start=0.5, denoising_end=0.3, steps=4,
                        progress=False)
    with pytest.raises(ValueError, match=r"image latents \(3, 4, 8, 8\) do not fit 1 images"):
        refiner.img2img(PROMPT, torch.zeros(3, 4, 8, 8), denoising_start=0.5, steps=4, progress=False)


def test_cli_refiner_equals_the_api_handoff(pair, tmp_path):
    from PIL import Image

    from latentdiff import cli

    base, refiner, *_ = pair
    base.save(tmp_path / "base.safetensors")
    refiner.save(tmp_path / "refiner.safetensors")
    cli.main(["generate", PROMPT, "-m", str(tmp_path / "base.safetensors"), "--refiner",
              str(tmp_path / "refiner.safetensors"), "--refiner-switch", "0.7", "--steps", "6", "--cfg", "5",
              "--sampler", "euler", "-H", "64", "-W", "64", "--dtype", "fp32", "-o", str(tmp_path / "o.png"), "-q"])
    latents = base(PROMPT, steps=6, guidance_scale=5.0, sampler="euler", height=64, width=64, denoising_end=0.7,
                   output="latent", progress=False)
    want = refiner.img2img(PROMPT, latents, denoising_start=0.7, steps=6, guidance_scale=5.0, sampler="euler",
                           progress=False)[0]
    assert Image.open(tmp_path / "o.png").tobytes() == want.tobytes()
