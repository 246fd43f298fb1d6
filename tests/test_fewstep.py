"""Few-step generation (issue #27) through the whole pipeline on the tiny SD 1.x and SDXL models: final latents
equal diffusers' StableDiffusion(XL)Pipeline with the scheduler each distilled model family uses, seed 0,
to 1e-3 relative.

- lcm / tcd vs LCMScheduler / TCDScheduler (eta 0.3, TCD's default; the diffusers pipelines pass eta=0.0 unless
  told) at 1, 2, 4, 8 steps, with CFG (7.5, negative prompt) and without (guidance 1).
- Turbo settings (euler_a, trailing, 1 step, guidance 0) vs EulerAncestralDiscreteScheduler(trailing); Lightning
  settings (euler, trailing, 4 steps, guidance 0) vs EulerDiscreteScheduler(trailing).
"""
from __future__ import annotations

import pytest
import torch

from conftest import diffusers_twin, rel_err, tiny_pipe, twin_pair
from latentdiff.sampling import samplers

diffusers = pytest.importorskip("diffusers")

PROMPT, NEG = "a lighthouse on a cliff at dusk", "fog"


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def pair(request, tmp_path_factory):
    return twin_pair(request.param, tmp_path_factory)


def _both(pipe, dpipe, steps, guidance, sampler, spacing=None, **dkw):
    neg = NEG if guidance > 1 else None
    theirs = dpipe(PROMPT, negative_prompt=neg, num_inference_steps=steps, guidance_scale=guidance, height=64,
                   width=64, generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **dkw).images
    ours = pipe(PROMPT, negative_prompt=neg, guidance_scale=guidance, steps=steps, seed=0, sampler=sampler,
                timestep_spacing=spacing, height=64, width=64, output="latent", progress=False)
    return ours, theirs


@pytest.mark.parametrize("guidance", [1.0, 7.5], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("sampler, cls, dkw", [("lcm", "LCMScheduler", {}), ("tcd", "TCDScheduler", {"eta": 0.3})],
                         ids=["lcm", "tcd"])
def test_consistency_samplers_match_diffusers(pair, sampler, cls, dkw, steps, guidance):
    pipe, dpipe, config = pair
    dpipe.scheduler = getattr(diffusers, cls).from_config(config)
    ours, theirs = _both(pipe, dpipe, steps, guidance, sampler, **dkw)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


@pytest.mark.parametrize("sampler, steps, cls", [("euler_a", 1, "EulerAncestralDiscreteScheduler"),
                                                 ("euler", 4, "EulerDiscreteScheduler"),
                                                 ("ddim", 8, "DDIMScheduler")], ids=["turbo", "lightning", "hyper"])
def test_turbo_lightning_settings_match_diffusers(pair, sampler, steps, cls):
    pipe, dpipe, config = pair
    dpipe.scheduler = getattr(diffusers, cls).from_config(config, timestep_spacing="trailing")
    ours, theirs = _both(pipe, dpipe, steps, 0.0, sampler, spacing="trailing")
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


def test_lcm_timesteps_and_errors():
    """The grids diffusers picks (shared/reference/wave2-formats.md 8.1), TCD ending at alphas_cumprod[0]."""
    grids = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259], 8: [999, 879, 759, 639, 499, 379, 259, 139]}
    for n, t in grids.items():
        for name in ("lcm", "tcd"):
            assert samplers.get_sigmas(name, n).timesteps.tolist() == t
    assert samplers.get_sigmas("lcm", 4).sigmas[-1] == 0
    assert samplers.get_sigmas("tcd", 4).sigmas[-1] == pytest.approx((0.00085 / (1 - 0.00085)) ** 0.5, rel=1e-4)  # beta_0 in float32
    with pytest.raises(ValueError, match="steps must be at most 50 for LCM / TCD"):
        samplers.get_sigmas("lcm", 51)
    with pytest.raises(ValueError, match="schedule must be 'normal' for LCM / TCD"):
        samplers.get_sigmas("tcd", 4, "karras")


# --- LCM-distilled U-Nets: the guidance-scale embedding (time_cond_proj_dim) -----------------------------------

@pytest.fixture(scope="module")
def lcm_files(tmp_path_factory):
    """A tiny SD 1.x with a guidance embedding (width 16) as a diffusers folder and as a plain single file (no
    latentdiff metadata: the config must come from the weights), plus diffusers' LatentConsistencyModelPipeline
    on the same weights."""
    from safetensors.torch import save_file

    from latentdiff import weights
    from latentdiff.config import PRESETS, with_guidance_embedding

    d = tmp_path_factory.mktemp("lcm")
    pipe = tiny_pipe(with_guidance_embedding(PRESETS["tiny-sd15"], 16))
    folder = d / "folder"
    pipe.save(folder, format="diffusers")
    (folder / "latentdiff_config.json").unlink()  # read unet/config.json and the weights only
    sd = weights.state_dict_of(pipe.cfg, {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders})
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in sd
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, d / "lcm.safetensors")
    lpipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder, local_files_only=True,
                                                                      safety_checker=None, feature_extractor=None)
    lpipe.scheduler = diffusers.LCMScheduler.from_config(lpipe.scheduler.config)
    lpipe.set_progress_bar_config(disable=True)
    return folder, d / "lcm.safetensors", lpipe


@pytest.mark.parametrize("source", ["folder", "single_file"])
def test_guidance_embedding_unet_matches_lcm_pipeline(lcm_files, source):
    import latentdiff

    folder, single, lpipe = lcm_files
    pipe = latentdiff.load(folder if source == "folder" else single, dtype=torch.float32)
    assert pipe.cfg.unet.time_cond_proj_dim == 16
    assert (pipe.cfg.sampler, pipe.cfg.steps, pipe.cfg.guidance_scale) == ("lcm", 4, 8.5)  # LCM pipeline defaults
    for guidance in (8.5, 1.0):
        theirs = lpipe(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
        ours = pipe(PROMPT, guidance_scale=guidance, seed=0, height=64, width=64, output="latent", progress=False)
        assert rel_err(ours, theirs) < 1e-3, (guidance, rel_err(ours, theirs))


def test_guidance_embedding_values_and_errors():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    from latentdiff.config import PRESETS, with_guidance_embedding
    from latentdiff.models.unet import UNetModel, guidance_embedding

    w = torch.tensor([0.0, 1.5, 7.5])
    for dim in (16, 17, 256):
        theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.allclose(guidance_embedding(w, dim), theirs, atol=1e-6, rtol=0), dim
    unet = UNetModel(with_guidance_embedding(PRESETS["tiny-sd15"], 16).unet)
    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.tensor([999.0]), torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="guidance must be given exactly when time_cond_proj_dim > 0"):
        unet(x, t, ctx)
    with pytest.raises(ValueError, match="guidance must be given exactly when time_cond_proj_dim > 0"):
        UNetModel(PRESETS["tiny-sd15"].unet)(x, t, ctx, guidance=torch.tensor([1.0]))


# --- LCM-LoRA: an ordinary LoRA file on a regular model, then the lcm sampler ---------------------------------

@pytest.mark.parametrize("guidance", [1.0, 2.0], ids=["nocfg", "cfg2"])
def test_lcm_lora_matches_diffusers(tmp_path, guidance):
    import safetensors.torch

    import lora_files as lf

    pipe = tiny_pipe("tiny-sd15")
    d = diffusers_twin(pipe, tmp_path / "d")
    d.set_progress_bar_config(disable=True)
    d.scheduler = diffusers.LCMScheduler.from_config(d.scheduler.config)
    # LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) is U-Net only: kohya names, attention, resnets, samplers
    sd = lf.kohya(lf.unet_locon_modules(d.unet), "lora_unet_", torch.Generator().manual_seed(0))
    safetensors.torch.save_file(sd, str(tmp_path / "lcm-lora.safetensors"))
    base, _ = _both(pipe, d, 4, guidance, "lcm")
    assert pipe.load_lora(tmp_path / "lcm-lora.safetensors") == "lcm-lora"
    d.load_lora_weights(str(tmp_path / "lcm-lora.safetensors"), adapter_name="lcm")
    ours, theirs = _both(pipe, d, 4, guidance, "lcm")
    assert rel_err(base, theirs) > 5e-2  # the LoRA matters
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


# --- TAESD as the final decoder, presets -------------------------------------------------------------------------

def _taesd_file(path):
    """diffusers' AutoencoderTiny with seeded weights, and its decoder as a released taesd_decoder.safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tiny = diffusers.AutoencoderTiny().eval()
    for p in tiny.parameters():
        p.data.normal_(0, 0.05)
    save_file({f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous()  # decoder.layers.N.x -> N+1.x
               for k, v in tiny.state_dict().items() if k.startswith("decoder.")}, str(path))
    return tiny


def test_taesd_final_decode_matches_diffusers_autoencoder_tiny(pair, tmp_path):
    import numpy as np

    pipe, dpipe, config = pair
    tiny = _taesd_file(tmp_path / "taesd_decoder.safetensors")
    pipe.load_preview(tmp_path / "taesd_decoder.safetensors")
    vae, dpipe.vae = dpipe.vae, tiny  # diffusers' pipelines take AutoencoderTiny as their vae (scaling factor 1)
    try:
        dpipe.scheduler = diffusers.LCMScheduler.from_config(config)
        theirs = dpipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    finally:
        dpipe.vae = vae
    kw = dict(guidance_scale=1.0, steps=2, seed=0, sampler="lcm", height=64, width=64, progress=False)
    ours = pipe(PROMPT, decoder="taesd", **kw)
    got = np.asarray(ours[0]).astype(int)
    assert np.abs(got - (theirs[0] * 255).round()).max() <= 1  # uint8 rounding
    assert "Steps: 2, Sampler: lcm" in ours[0].info["parameters"]
    assert not np.array_equal(got, np.asarray(pipe(PROMPT, **kw)[0]))  # the VAE's image is another one


def test_taesd_decoder_errors_before_sampling(tmp_path):
    from latentdiff.models.preview import PreviewConfig, PreviewDecoder

    pipe, calls = tiny_pipe("tiny-sd15"), []
    kw = dict(steps=2, progress=False, callback=lambda *a: calls.append(a))
    with pytest.raises(ValueError, match=r"decoder='taesd' needs a TAESD decoder loaded for tiny-sd15 \(random\) \(loaded: "
                                         r"none\): call pipe.load_preview\('taesd_decoder.safetensors'\)"):
        pipe(PROMPT, decoder="taesd", **kw)
    pipe.preview_decoder = PreviewDecoder(PreviewConfig())
    with pytest.raises(ValueError, match=r"loaded: a PreviewDecoder \(not TAESD\)"):
        pipe(PROMPT, decoder="taesd", **kw)
    with pytest.raises(ValueError, match=r"decoder must be one of \('vae', 'taesd'\), got 'tiny'"):
        pipe(PROMPT, decoder="tiny", **kw)
    assert calls == []  # nothing was sampled


def test_cli_presets_fill_unset_options_and_decoder_taesd(tmp_path):
    from PIL import Image

    from latentdiff import cli
    from latentdiff.images import parse_parameters

    def run(*args):
        out = tmp_path / "o.png"
        cli.main(["generate", "a cat", "--random-preset", "tiny-sd15", "-o", str(out), "-q", *args])
        return parse_parameters(Image.open(out).info["parameters"])

    p = run("--preset", "turbo")
    assert (p["steps"], p["sampler"], p["guidance_scale"]) == (1, "euler_a", 0.0)
    p = run("--preset", "lightning", "--steps", "2", "--cfg", "1.5")  # given options win
    assert (p["steps"], p["sampler"], p["guidance_scale"]) == (2, "euler", 1.5)
    p = run("--preset", "hyper", "--steps", "2")
    assert (p["steps"], p["sampler"], p["guidance_scale"]) == (2, "ddim", 0.0) and "eta" not in p
    p = run("--preset", "lcm", "--sampler", "tcd", "--eta", "0.5")  # eta is written to the PNG and read back
    assert (p["steps"], p["sampler"], p["eta"]) == (4, "tcd", 0.5)
    _taesd_file(tmp_path / "taesd_decoder.safetensors")
    p = run("--preset", "lcm", "--decoder", "taesd", "--taesd", str(tmp_path / "taesd_decoder.safetensors"))
    assert (p["steps"], p["sampler"], p["guidance_scale"]) == (4, "lcm", 1.0)
    with pytest.raises(SystemExit, match="decoder='taesd' needs a TAESD decoder"):
        run("--decoder", "taesd")


def test_lcm_preset_keeps_a_distilled_models_guidance():
    from latentdiff.config import PRESETS, with_guidance_embedding
    from latentdiff.fewstep import preset_settings

    assert preset_settings("lcm", PRESETS["tiny-sd15"])["guidance_scale"] == 1.0  # LCM-LoRA: no CFG
    assert preset_settings("lcm", with_guidance_embedding(PRESETS["tiny-sd15"], 16))["guidance_scale"] == 8.5
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_settings("flux", PRESETS["tiny-sd15"])


@pytest.mark.parametrize("sampler, cls, eta", [("tcd", "TCDScheduler", 0.0), ("tcd", "TCDScheduler", 0.7),
                                               ("ddim", "DDIMScheduler", 0.5)])
def test_eta_reaches_the_sampler_as_in_diffusers(pair, sampler, cls, eta):
    """pipe(..., eta=) is diffusers' pipeline eta (TCD's gamma, DDIM's sigma_t(eta)); it changes the image."""
    pipe, dpipe, config = pair
    dpipe.scheduler = getattr(diffusers, cls).from_config(config)
    neg, g = NEG, torch.Generator("cpu").manual_seed(0)
    theirs = dpipe(PROMPT, negative_prompt=neg, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                   generator=g, output_type="latent", eta=eta).images
    ours = pipe(PROMPT, negative_prompt=neg, guidance_scale=7.5, steps=4, seed=0, sampler=sampler, height=64,
                width=64, output="latent", progress=False, eta=eta)
    default = pipe(PROMPT, negative_prompt=neg, guidance_scale=7.5, steps=4, seed=0, sampler=sampler, height=64,
                   width=64, output="latent", progress=False)
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)
    assert rel_err(ours, default) > 1e-3  # 0.3 / 0.0 are the defaults: eta really arrived


def test_eta_errors_name_the_sampler():
    pipe = tiny_pipe("tiny-sd15")
    with pytest.raises(ValueError, match=r"sampler 'euler' takes no eta; eta is for \[.*'ddim'.*'tcd'"):
        pipe("x", sampler="euler", eta=0.5, steps=1, height=64, width=64, output="latent", progress=False)
    with pytest.raises(ValueError, match=r"eta for 'tcd' must be in \[0, 1\], got 1.5"):
        pipe("x", sampler="tcd", eta=1.5, steps=1, height=64, width=64, output="latent", progress=False)
    with pytest.raises(ValueError, match=r"eta for 'ddim' must be >= 0, got -0.1"):
        pipe("x", sampler="ddim", eta=-0.1, steps=1, height=64, width=64, output="latent", progress=False)
    assert {"ddim", "tcd", "euler_a", "dpmpp_2s_a"} <= set(samplers.eta_samplers())
    kw = dict(steps=3, height=64, width=64, output="latent", progress=False)
    euler, euler_a = pipe("x", sampler="euler", **kw), pipe("x", sampler="euler_a", **kw)
    assert torch.allclose(pipe("x", sampler="euler_a", eta=0.0, **kw), euler, atol=1e-6)  # no fresh noise
    assert torch.equal(pipe("x", sampler="euler_a", eta=1.0, **kw), euler_a)  # 1 is the default
    assert rel_err(euler_a, euler) > 1e-2
