"""Few-step generation: the settings each distilled model family wants, and TAESD as the final decoder.

With 1-8 U-Net steps the VAE decode is the largest single cost of an image (about 2.5 TFLOP at 512 px, three SD
1.5 U-Net steps); TAESD's decoder (github.com/madebyollin/taesd) does it in about 0.14 TFLOP, at a lower
fidelity (benchmarks/README.md, "Few-step generation", has the times).

Settings per family (model cards; the samplers reproduce the diffusers schedulers named, tests/test_fewstep.py):

    preset     sampler  steps  guidance  spacing   for
    lcm        lcm      4      1.0       (own)     LCM-LoRA (SD 1.5 / SDXL / SSD-1B): LCMScheduler, 2-8 steps,
                                                   guidance 1-2; LCM-distilled full models keep their own 8.5
                                                   (the U-Net embeds it, no CFG pass)
    turbo      euler_a  1      0.0       trailing  SD-Turbo / SDXL-Turbo: EulerAncestral, 1-4 steps, 512 px
    lightning  euler    4      0.0       trailing  SDXL-Lightning N-step (steps must equal N: 2, 4, 8)
    hyper      ddim     8      0.0       trailing  Hyper-SD / Hyper-SDXL N-step LoRAs (DDIMScheduler, trailing;
                                                   steps must equal N: 1, 2, 4, 8; the "CFG" LoRAs take 5-8)

TCD (`sampler="tcd"`, TCDScheduler; `eta` = its gamma, 0.3 default, lower for more detail) takes the lcm settings;
Hyper-SD's 1-step unified LoRA is sampled with tcd and eta 1.0 on its card.
"""
from __future__ import annotations

from .config import ModelConfig
from .models.preview import TAESDDecoder

SETTINGS: dict[str, dict] = {  # --preset NAME
    "lcm": dict(sampler="lcm", steps=4, guidance_scale=1.0, timestep_spacing=None),
    "turbo": dict(sampler="euler_a", steps=1, guidance_scale=0.0, timestep_spacing="trailing"),
    "lightning": dict(sampler="euler", steps=4, guidance_scale=0.0, timestep_spacing="trailing"),
    "hyper": dict(sampler="ddim", steps=8, guidance_scale=0.0, timestep_spacing="trailing"),
}
DECODERS = ("vae", "taesd")


def preset_settings(name: str, cfg: ModelConfig) -> dict:
    """Pipeline keywords of preset `name` for a model of config `cfg` (an LCM-distilled U-Net, one with a
    guidance embedding, keeps its own guidance default)."""
    if name not in SETTINGS:
        raise ValueError(f"preset must be one of {sorted(SETTINGS)}, got {name!r}")
    kw = dict(SETTINGS[name])
    if name == "lcm" and cfg.unet.time_cond_proj_dim:
        kw["guidance_scale"] = cfg.guidance_scale
    return kw


def check_decoder(decoder: str, preview_decoder, model_name: str) -> None:
    """Before sampling: decoder="taesd" needs a TAESD / TAESDXL decoder loaded with pipe.load_preview."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "taesd" and not isinstance(preview_decoder, TAESDDecoder):
        found = "none" if preview_decoder is None else f"a {type(preview_decoder).__name__} (not TAESD)"
        raise ValueError(f"decoder='taesd' needs a TAESD decoder loaded for {model_name} (loaded: {found}): call "
                         "pipe.load_preview('taesd_decoder.safetensors') (taesdxl_decoder.safetensors for SDXL), or "
                         "pass --taesd FILE on the command line")
