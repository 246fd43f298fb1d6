"""The single-file key layout: part prefixes, keys that are not weights, the modules a config builds, key
checks, architecture detection and the prediction type.

Since our module paths equal the original keys, each part of a single file is the module's state dict under one
prefix (`parts`); a file matches a config when its keys and shapes equal `expected_shapes(cfg)`.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

from accelerate import init_empty_weights
from torch import nn

from ..config import SD15, SD21, SDXL, ModelConfig, with_inpainting
from .io import CheckpointError

log = logging.getLogger("latentdiff")

CONFIG_KEY = "latentdiff_config"

# Single-file prefixes of each part, by family.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": ("cond_stage_model.",),
    "sd2": ("cond_stage_model.",),
    "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1."),
}

# Keys in released files that are not network weights (see shared/reference/checkpoint-layouts/README.md).
DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}


def is_ignored(key: str) -> bool:
    return key in DDPM_BUFFERS or key.startswith("model_ema.") or key.endswith("embeddings.position_ids")


def detect(shapes: dict[str, tuple[int, ...]], path: Path | str = "checkpoint") -> ModelConfig:
    """Architecture from key names and shapes alone: SD1, SD2, SDXL, each optionally 9-channel inpainting."""
    if "conditioner.embedders.1.model.token_embedding.weight" in shapes:
        cfg = SDXL
    elif "cond_stage_model.model.token_embedding.weight" in shapes:
        cfg = SD21
    elif "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes:
        cfg = SD15
    else:
        roots = sorted({".".join(k.split(".")[:2]) for k in shapes})
        raise CheckpointError(
            f"{path}: unknown checkpoint layout: no SD1 (cond_stage_model.transformer.*), SD2 "
            f"(cond_stage_model.model.*) or SDXL (conditioner.embedders.*) text encoder keys. Found {len(shapes)} "
            f"tensors under: {roots[:20]}. Pass config= (a preset name or a YAML file) if this is a custom model.")
    w = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if w is not None and w[1] == 9:
        cfg = with_inpainting(cfg)
    return cfg


def resolve_prediction_type(cfg: ModelConfig, argument: str | None, config_from: str | None,
                            metadata: dict, get) -> ModelConfig:
    """eps vs v: the argument, then a config (given by the caller or stored in the file), then the file's
    `prediction_type` metadata, then a documented default. Logs which it used and why.

    The default is epsilon, except for SD 2.x files, where ComfyUI's weight rule applies: the 768-v models have
    a wide spread in one LayerNorm bias (std of output_blocks.11.1.transformer_blocks.0.norm1.bias > 0.09)."""
    if argument is not None:
        if argument not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {argument!r}")
        pt, why = argument, "the prediction_type argument"
    elif config_from is not None:
        pt, why = cfg.prediction_type, config_from
    elif metadata.get("prediction_type") in ("epsilon", "v_prediction"):
        pt, why = metadata["prediction_type"], "the file's 'prediction_type' metadata"
    elif cfg.family == "sd2":
        b = get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias").float()
        pt = "v_prediction" if b.std(unbiased=False) > 0.09 else "epsilon"
        why = "the SD 2.x weight rule (norm1.bias std > 0.09 means v); pass prediction_type= to override"
    else:
        pt, why = "epsilon", f"the default for {cfg.family} checkpoints; pass prediction_type= to override"
    log.info("prediction_type=%s, decided by %s", pt, why)
    return replace(cfg, prediction_type=pt)


def build_modules(cfg: ModelConfig, meta: bool = True) -> dict:
    """{"unet", "vae", "text_encoders"}; with meta=True the parameters live on the meta device (buffers such
    as position ids and attention masks are real) and must be filled by `load_parts`."""
    from ..models.text import build_text_encoder
    from ..models.unet import UNetModel
    from ..models.vae import AutoencoderKL

    with init_empty_weights(include_buffers=False) if meta else contextlib.nullcontext():
        return {
            "unet": UNetModel(cfg.unet),
            "vae": AutoencoderKL(cfg.vae),
            "text_encoders": nn.ModuleList(build_text_encoder(t) for t in cfg.text),
        }


def parts(cfg: ModelConfig, modules: dict) -> list[tuple[str, nn.Module]]:
    """[(key prefix, module)] of a single file, e.g. ("conditioner.embedders.1.", modules["text_encoders"][1])."""
    return [(UNET_PREFIX, modules["unet"]), (VAE_PREFIX, modules["vae"])] + [
        (p, modules["text_encoders"][i]) for i, p in enumerate(TEXT_PREFIXES[cfg.family])]


def state_dict_of(cfg: ModelConfig, modules: dict) -> dict:
    """The single file's {key: tensor} of `modules`."""
    return {prefix + k: v for prefix, m in parts(cfg, modules) for k, v in m.state_dict().items()}


def expected_shapes(cfg: ModelConfig, modules: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every key a single file of this config must hold, with its shape (computed on the meta device)."""
    return {k: tuple(v.shape) for k, v in state_dict_of(cfg, modules or build_modules(cfg)).items()}


def check_keys(path, expected: dict, found: dict) -> None:
    """Raise one CheckpointError naming every missing, unexpected or mis-shaped key (first 10 of each)."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not is_ignored(k))
    wrong = sorted(f"{k}: expected {list(expected[k])}, file has {list(found[k])}"
                   for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if keys:
            problems.append(f"{len(keys)} {what}: " + "; ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
    if problems:
        raise CheckpointError(f"{path}: does not match the {len(expected)}-tensor layout it was detected as: "
                              + " | ".join(problems))
