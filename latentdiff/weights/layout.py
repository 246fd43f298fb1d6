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

from ..config import SD21, ModelConfig
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
    "sdxl_refiner": ("conditioner.embedders.0.",),  # OpenCLIP bigG alone
}

# Keys in released files that are not network weights (see shared/reference/checkpoint-layouts/README.md).
DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}
# Empty tensors some v-prediction SDXL files carry as flags (ComfyUI's SDXL.model_type reads them)
MARKERS = {"v_pred", "ztsnr"}
EMA_PREFIX = "model_ema."  # CompVis LitEma: model_ema.<U-Net key without "model." and without dots>
# Older transformers kept CLIPTextModel's keys without "text_model."; released SD 1.x files exist in both forms
_OLD_CLIP = [(p + "transformer.", p + "transformer.text_model.")
             for p in ("cond_stage_model.", "conditioner.embedders.0.")]
_OLD_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_LORA_PARTS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora_mid.", ".hada_w1_a", ".lokr_w1")


def is_ignored(key: str) -> bool:
    return (key in DDPM_BUFFERS or key in MARKERS or key.startswith(EMA_PREFIX)
            or key.endswith("embeddings.position_ids"))


def _leftover(key: str) -> bool:
    """Training leftovers in full checkpoints: the VAE's loss (discriminator, LPIPS), LoRA factors."""
    return key.startswith(("loss.", "lora_")) or any(p in key for p in _LORA_PARTS)


def file_names(shapes: dict, ema: bool = False, path="checkpoint") -> dict[str, str]:
    """{our key: the file's key} for every tensor a model reads from a single file.

    Drops what is not a weight (DDPM buffers, position ids, markers; in a file with a U-Net, training leftovers
    `loss.*` / `lora_*`, with one log line),
    renames old-transformers CLIP keys (`cond_stage_model.transformer.encoder...` -> `...text_model.encoder...`)
    and, with `ema`, reads the U-Net from its EMA copy (`model_ema.diffusion_modelinput_blocks00weight`)."""
    names, leftovers = {}, []
    model = any(k.startswith(UNET_PREFIX) for k in shapes)  # else a LoRA's keys are kept, for `detect` to name it
    for key in shapes:
        if is_ignored(key):
            continue
        if model and _leftover(key):
            leftovers.append(key)
            continue
        ours = key
        for old, new in _OLD_CLIP:
            if key.startswith(old) and key[len(old):].startswith(_OLD_CLIP_PARTS):
                ours = new + key[len(old):]
        names[ours] = key
    if leftovers:
        log.info("%s: %d keys that are not model weights ignored (%s ...)", path, len(leftovers), leftovers[0])
    ema_weights = [k for k in shapes if k.startswith(EMA_PREFIX) and k not in ("model_ema.decay",
                                                                                  "model_ema.num_updates")]
    if ema:
        unet = [k for k in names if k.startswith(UNET_PREFIX)]
        missing = [k for k in unet if _ema_name(k) not in shapes]
        if not ema_weights or missing:
            raise CheckpointError(f"{path}: ema=True but the file has {len(ema_weights)} EMA weights (model_ema.*) "
                                  f"and lacks the EMA copy of {len(missing)} U-Net tensors, e.g. "
                                  f"{missing[:3]}; load it with ema=False")
        names.update({k: _ema_name(k) for k in unet})
        log.info("%s: U-Net weights from the EMA copy (%d model_ema.* tensors)", path, len(unet))
    elif ema_weights:
        log.info("%s: also holds %d EMA weights (model_ema.*), not used; ema=True loads them instead", path,
                 len(ema_weights))
    return names


def _ema_name(key: str) -> str:
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _family(shapes) -> str | None:
    if ("conditioner.embedders.1.model.token_embedding.weight" in shapes
            and "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in shapes):
        return "sdxl"
    if ("conditioner.embedders.0.model.token_embedding.weight" in shapes
            and not any(k.startswith("conditioner.embedders.1.") for k in shapes)):
        return "sdxl_refiner"
    if "cond_stage_model.model.token_embedding.weight" in shapes:
        return "sd2"
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes:
        return "sd1"
    return None


def _not_a_model(shapes, path) -> str:
    """What a file without a known U-Net + text encoder holds, and what to do with it."""
    keys = [k for k in shapes if not is_ignored(k)]
    roots = sorted({".".join(k.split(".")[:2]) for k in keys})
    found = f"Found {len(shapes)} tensors under: {roots[:20]}"
    lora = [k for k in keys if k.startswith(("lora_unet_", "lora_te")) or any(p in k for p in _LORA_PARTS)]
    vae = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    text = ("cond_stage_model.", "conditioner.embedders.", "text_model.", "transformer.", "embeddings.",
            "encoder.layers.", "final_layer_norm.", "token_embedding.", "positional_embedding", "ln_final.",
            "text_projection", "logit_scale")
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if lora and len(lora) * 2 >= len(keys):
        return (f"{path}: a LoRA ({len(lora)} of its {len(keys)} tensors are LoRA factors, e.g. {lora[0]}), not a "
                "model: load a model, then pipe.load_lora(path) (or <lora:name:1> in a prompt)")
    if keys and not has_unet and all(k.startswith(VAE_PREFIX) or k.startswith(vae) or k.startswith("loss.")
                                     for k in keys):
        return (f"{path}: a standalone VAE ({len(keys)} tensors), not a whole model: "
                "latentdiff.load(model_path, vae=path), or pipe.load_vae(path)")
    if keys and set(keys) <= {"emb_params", "clip_l", "clip_g"}:
        return f"{path}: a textual-inversion embedding, not a model: pipe.load_embedding(path)"
    if keys and not has_unet and all(k.startswith(text) for k in keys):
        return (f"{path}: only a text encoder ({len(keys)} tensors), not a whole model; it cannot be loaded on "
                f"its own: load a full checkpoint or diffusers folder. {found}")
    if has_unet:
        return (f"{path}: a U-Net ({UNET_PREFIX}*) without a known text encoder: no SD1 "
                "(cond_stage_model.transformer.*), SD2 (cond_stage_model.model.*) or SDXL (conditioner.embedders.0/1) "
                f"keys. {found}. Pass config= (a preset name or a YAML file) if this is a custom model.")
    return (f"{path}: unknown checkpoint layout: no SD1 (cond_stage_model.transformer.*), SD2 "
            f"(cond_stage_model.model.*), SDXL or SDXL refiner (conditioner.embedders.*) text encoder keys. {found}. "
            "Pass config= (a preset name or a YAML file) if this is a custom model.")


def detect(shapes: dict[str, tuple[int, ...]], path: Path | str = "checkpoint") -> ModelConfig:
    """Architecture from key names and shapes alone (our keys, see `file_names`): the family (SD1, SD2, SDXL)
    from the text-encoder keys, every size from the weights (infer.py), a preset's name when one has them."""
    from .infer import model_config

    family = _family(shapes)
    if family is None or UNET_PREFIX + "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(_not_a_model(shapes, path))
    cfg, preset = model_config(shapes, family, TEXT_PREFIXES[family], VAE_PREFIX, path)
    if preset:
        log.info("%s: the weights have the shapes of the %s preset", path, cfg.name)
    else:
        log.info("%s: %s-family weights whose shapes match no preset; the config is read from them", path,
                 cfg.family)
    return cfg


def _pt_name(value: str) -> str | None:
    v = value.strip().lower()
    return "v_prediction" if v in ("v", "v_prediction", "v-prediction", "velocity") else \
        "epsilon" if v in ("epsilon", "eps") else None


def _prediction_from_metadata(metadata: dict) -> tuple[str, str] | None:
    """(prediction type, why) from Stability's ModelSpec keys, kohya's ss_* keys or our own key."""
    for key in ("prediction_type", "modelspec.prediction_type"):
        pt = _pt_name(metadata.get(key, ""))
        if pt:
            return pt, f"the file's {key!r} metadata ({metadata[key]!r})"
    arch = metadata.get("modelspec.architecture", "").split("/")[0]
    if arch in ("stable-diffusion-v2-768-v", "stable-diffusion-v2-512"):  # the two SD 2 kinds ModelSpec names
        return ("v_prediction" if arch.endswith("-v") else "epsilon"), f"the file's ModelSpec architecture {arch!r}"
    v = metadata.get("ss_v_parameterization", "").lower()
    if v in ("true", "false"):
        return ("v_prediction" if v == "true" else "epsilon"), f"kohya's ss_v_parameterization metadata ({v})"
    return None


def _check_family(cfg: ModelConfig, metadata: dict, path) -> None:
    arch = metadata.get("modelspec.architecture", "").split("/")[0]
    said = ("sdxl_refiner" if arch.startswith("stable-diffusion-xl-v1-refiner") else
            "sdxl" if arch.startswith("stable-diffusion-xl") else "sd2" if arch.startswith("stable-diffusion-v2")
            else "sd1" if arch.startswith("stable-diffusion-v1") else None)
    if metadata.get("ss_v2", "").lower() == "true":
        said = said or "sd2"
    if said and said != cfg.family:
        log.warning("%s: its metadata names a %s model (%s) but its weights are %s; going by the weights", path,
                    said, arch or "ss_v2", cfg.family)


def resolve_prediction_type(cfg: ModelConfig, argument: str | None, config_from: str | None,
                            metadata: dict, get, keys=(), path="checkpoint") -> ModelConfig:
    """eps vs v and zero terminal SNR, each from the first of: the argument (prediction type only), a config
    (given by the caller or stored in the file), the file's metadata (our `prediction_type`, Stability's
    ModelSpec `modelspec.prediction_type` / `modelspec.architecture`, kohya's `ss_v_parameterization` /
    `ss_zero_terminal_snr`), marker tensors (`v_pred`, `ztsnr`, among `keys`), a documented default. Logs which
    decided. ModelSpec's `modelspec.resolution` sets the recommended size unless a config was given.

    The default is epsilon, except for full-size SD 2.x files, where ComfyUI's weight rule applies: the 768-v
    models have a wide spread in one LayerNorm bias (std of output_blocks.11.1.transformer_blocks.0.norm1.bias
    > 0.09)."""
    keys = set(keys)
    if config_from is None:
        _check_family(cfg, metadata, path)
    from_metadata = _prediction_from_metadata(metadata)
    if argument is not None:
        if argument not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {argument!r}")
        pt, why = argument, "the prediction_type argument"
    elif config_from is not None:
        pt, why = cfg.prediction_type, config_from
    elif from_metadata is not None:
        pt, why = from_metadata
    elif "v_pred" in keys:
        pt, why = "v_prediction", "the file's v_pred marker tensor"
    elif cfg.family == "sd2" and replace(cfg.unet, in_channels=4) == SD21.unet:
        b = get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias").float()
        pt = "v_prediction" if b.std(unbiased=False) > 0.09 else "epsilon"
        why = "the SD 2.x weight rule (norm1.bias std > 0.09 means v); pass prediction_type= to override"
    else:
        pt, why = "epsilon", f"the default for {cfg.family} checkpoints; pass prediction_type= to override"
    zsnr_flag = metadata.get("ss_zero_terminal_snr", "").lower()
    if config_from is not None:
        zsnr, zwhy = cfg.zero_terminal_snr, config_from
    elif zsnr_flag in ("true", "false"):
        zsnr, zwhy = zsnr_flag == "true", f"kohya's ss_zero_terminal_snr metadata ({zsnr_flag})"
    elif "ztsnr" in keys:
        zsnr, zwhy = True, "the file's ztsnr marker tensor"
    else:
        zsnr, zwhy = cfg.zero_terminal_snr, "the default"
    log.info("prediction_type=%s, decided by %s; zero_terminal_snr=%s, decided by %s", pt, why, zsnr, zwhy)
    size = cfg.size
    w, _, h = metadata.get("modelspec.resolution", "").partition("x")
    if config_from is None and w.strip().isdigit() and w.strip() == h.strip():
        size = int(w)
        log.info("recommended size %d, from the file's modelspec.resolution", size)
    return replace(cfg, prediction_type=pt, zero_terminal_snr=zsnr, size=size)


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
