"""diffusers-format folders: read (model_index.json, unet/, vae/, text_encoder(_2)/, scheduler/) and write.

The rename tables are in weights/diffusers/; this file maps the folder's JSON configs to ours and back.
The tokenizer is always ours (open_clip's BPE); on save we also write CLIP tokenizer files built from that same
BPE, so diffusers' `from_pretrained(folder)` works offline.

SD 2.x: diffusers' text encoder holds only the 23 blocks SD2 uses; the released file's last block,
`text_projection` and `logit_scale` are unused for conditioning and not in the folder. Reading a folder fills
them with zeros (a zero pre-norm block is the identity) and logs their names, so the model has the released
24-block layout and saves back to a standard single file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..models.bpe import BPE
from .diffusers import text as text_fmt
from .diffusers import unet as unet_fmt
from .diffusers import vae as vae_fmt
from .io import CheckpointError, SafetensorsFile, read_in_background, write_safetensors
from .infer import SIZE_NUMBERS
from .layout import build_modules, check_keys, resolve_prediction_type

log = logging.getLogger("latentdiff")

DIFFUSERS_VERSION = "0.42.1"
TEXT_DIRS = ("text_encoder", "text_encoder_2")


def _pooled_dim(cfg: ModelConfig) -> int:
    return cfg.text[-1].projection_dim if cfg.family.startswith("sdxl") else 0


def _role(family: str) -> str:
    """The text-encoder role (diffusers/text.py) of a family: the refiner's bigG is stored as SDXL's."""
    return "sdxl" if family == "sdxl_refiner" else family


def text_dirs(cfg: ModelConfig) -> tuple[str, ...]:
    """The folders of cfg.text in order: the refiner has only SDXL's second encoder (text_encoder_2)."""
    return TEXT_DIRS[1:] if cfg.family == "sdxl_refiner" else TEXT_DIRS[:len(cfg.text)]


# --- configs: diffusers JSON -> ours ---------------------------------------------------------------------


def unet_config_from(d: dict) -> UNetConfig:
    boc = d["block_out_channels"]
    levels = len(boc)
    r = d.get("layers_per_block", 2)
    if not isinstance(r, int):  # a per-level list: ours is one count for every level
        if len(set(r)) != 1:
            raise CheckpointError(f"unet/config.json: layers_per_block {r} differs between levels (not supported)")
        r = r[0]
    tl = d.get("transformer_layers_per_block", 1)
    tl = [tl] * levels if isinstance(tl, int) else [_one_depth(t, "transformer_layers_per_block") for t in tl]
    depth = tuple(tl[i] if "CrossAttn" in t else 0 for i, t in enumerate(d["down_block_types"]))
    # up blocks, lowest resolution first: per block from reverse_transformer_layers_per_block, else mirrored
    rev = d.get("reverse_transformer_layers_per_block")
    up = []
    for k, t in enumerate(d["up_block_types"]):
        per = rev[k] if rev is not None else tl[levels - 1 - k]
        per = [per] * (r + 1) if isinstance(per, int) else list(per)
        up += per if "CrossAttn" in t else [0] * (r + 1)
    mid_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid = tl[-1] if mid_type == "UNetMidBlock2DCrossAttn" else 0
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' naming, see unet_fmt
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    per_head = {boc[i] // heads[i] for i in range(levels) if depth[i]}
    if all(h == heads[0] for h in heads) and not d.get("use_linear_projection"):
        head_kw = dict(num_heads=heads[0], head_channels=0)  # SD1: a fixed number of heads
    elif len(per_head) == 1:
        head_kw = dict(head_channels=per_head.pop())  # SD2 / SDXL: 64 channels per head
    else:
        raise CheckpointError(f"unet/config.json: attention heads {heads} fit neither a fixed head count nor a "
                              "fixed head width")
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=r, transformer_depth=depth,
        transformer_depth_output=() if up == [x for x in reversed(depth) for _ in range(r + 1)] else tuple(up),
        transformer_depth_middle=mid, middle_block=mid_type is not None, context_dim=d["cross_attention_dim"],
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        adm_in_channels=d.get("projection_class_embeddings_input_dim") or 0
        if d.get("addition_embed_type") == "text_time" else 0,
        time_cond_proj_dim=d.get("time_cond_proj_dim") or 0,
        norm_groups=d.get("norm_num_groups", 32), **head_kw)


def _one_depth(t, name: str) -> int:
    """A level's transformer depth; diffusers also allows a list per block, which ours holds only when equal."""
    if isinstance(t, int):
        return t
    if len(set(t)) != 1:
        raise CheckpointError(f"unet/config.json: {name} {t} differs within a down level (not supported)")
    return t[0]


def vae_config_from(d: dict) -> VAEConfig:
    boc = d["block_out_channels"]
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3), ch=boc[0],
                     ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=d.get("layers_per_block", 2),
                     z_channels=d.get("latent_channels", 4), norm_groups=d.get("norm_num_groups", 32),
                     scaling_factor=d.get("scaling_factor", 0.18215))


def text_config_from(d: dict, family: str, index: int) -> TextEncoderConfig:
    common = dict(width=d["hidden_size"], layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
                  mlp_ratio=d["intermediate_size"] / d["hidden_size"], act=d.get("hidden_act", "quick_gelu"),
                  vocab_size=d.get("vocab_size", 49408), context_length=d.get("max_position_embeddings", 77))
    if family == "sd1":
        return TextEncoderConfig(kind="clip", **common)
    if family == "sd2":  # the released tower: one more block than the folder holds, read at the penultimate
        common["layers"] += 1
        return TextEncoderConfig(kind="open_clip", pad_id=0, layer_from_end=2, final_norm=True,
                                 projection_dim=d["hidden_size"], **common)
    if index == 0:  # SDXL CLIP-L: penultimate, no final norm
        return TextEncoderConfig(kind="clip", layer_from_end=2, final_norm=False, **common)
    return TextEncoderConfig(kind="open_clip", pad_id=0, layer_from_end=2, final_norm=False,
                             projection_dim=d.get("projection_dim", d["hidden_size"]), **common)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a complete diffusers folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _weights_file(d: Path) -> SafetensorsFile:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (d / name).is_file():
            return SafetensorsFile(d / name)
    if any(d.glob("*.bin")):
        raise CheckpointError(f"{d}: only pickled .bin weights; convert them to .safetensors first (latentdiff "
                              "reads no unrestricted pickles)")
    raise CheckpointError(f"{d}: no diffusion_pytorch_model.safetensors or model.safetensors "
                          "(sharded or variant-named weights are not supported)")


def read_folder(path, config: ModelConfig | None = None, prediction_type: str | None = None,
                dtype: torch.dtype | None = None, device="cpu"):
    """A diffusers folder -> (ModelConfig, modules), loaded strictly through the rename tables."""
    path = Path(path)
    index = _read_json(path / "model_index.json")
    cls = index.get("_class_name", "")
    dirs = [t for t in TEXT_DIRS if t in index and index[t][0] is not None]
    # the refiner (StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score): text_encoder_2 alone
    family = None if "XL" not in cls else "sdxl_refiner" if dirs == ["text_encoder_2"] else "sdxl"
    text_json = [_read_json(path / t / "config.json") for t in dirs]
    if family is None:
        family = "sd2" if text_json and text_json[0].get("hidden_act") == "gelu" else "sd1"
    sched = _read_json(path / "scheduler" / "scheduler_config.json") if (path / "scheduler").is_dir() else {}
    if config is None:
        config = ModelConfig(
            name=f"{path.name}", family=family,
            unet=unet_config_from(_read_json(path / "unet" / "config.json")),
            vae=vae_config_from(_read_json(path / "vae" / "config.json")),
            text=tuple(text_config_from(d, _role(family), TEXT_DIRS.index(t)) for t, d in zip(dirs, text_json)),
            prediction_type=sched.get("prediction_type", "epsilon"),
            beta_start=sched.get("beta_start", 0.00085), beta_end=sched.get("beta_end", 0.012),
            num_train_timesteps=sched.get("num_train_timesteps", 1000),
            zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
            timestep_spacing="leading" if family.startswith("sdxl") else None,
            size=1024 if family.startswith("sdxl") else 768 if sched.get("prediction_type") == "v_prediction" else 512)
        config_from = "the folder's scheduler_config.json" if "prediction_type" in sched else None
        if config.unet.time_cond_proj_dim:  # LCM-distilled: LatentConsistencyModelPipeline's defaults
            config = replace(config, sampler="lcm", steps=4, guidance_scale=8.5)
        if (path / "latentdiff_config.json").is_file():  # written by us: keep the recommended defaults
            ours = ModelConfig.from_json((path / "latentdiff_config.json").read_text())
            config = replace(config, name=ours.name, size=ours.size, sampler=ours.sampler, steps=ours.steps,
                             guidance_scale=ours.guidance_scale)
    else:
        config_from = "the config argument"
    cfg = resolve_prediction_type(config, prediction_type, config_from, {}, None)
    if text_dirs(cfg) != tuple(dirs):
        raise CheckpointError(f"{path}: the folder holds {dirs}, a {cfg.family} model needs {list(text_dirs(cfg))}")
    files = {sub: _weights_file(path / sub) for sub in ["unet", "vae", *dirs]}
    jobs = {(sub, k): (lambda f=f, k=k: f.get(k, dtype).to(device)) for sub, f in files.items() for k in f.entries}
    with read_in_background(jobs) as tensors:  # converts while build_modules imports transformers
        modules = build_modules(cfg)
        read = tensors()
    parts = [("unet", modules["unet"], lambda sd: unet_fmt.from_diffusers(sd, cfg.unet)),
             ("vae", modules["vae"], lambda sd: vae_fmt.from_diffusers(sd, cfg.vae))]
    role = _role(cfg.family)
    for i, t in enumerate(dirs):
        parts.append((t, modules["text_encoders"][i], lambda sd, i=i: text_fmt.from_diffusers(sd, cfg.text[i], role)))
    for sub, mod, convert in parts:
        f = files[sub]
        if sub.startswith("text_encoder"):
            absent = text_fmt.absent_in_diffusers(cfg.text[dirs.index(sub)], role)
            if absent:
                log.info("%s: %d tensors the diffusers format does not hold are zero-filled: %s%s", sub,
                         len(absent), ", ".join(absent[:4]), " ..." if len(absent) > 4 else "")
        try:
            sd = convert({k: read.pop((sub, k)) for k in f.entries})  # pop: what convert copies is not held twice
        except ValueError as e:
            raise CheckpointError(f"{f.path}: {e}") from e
        _load_strict(mod, sd, f.path, dtype, device)
    return cfg, modules


def _load_strict(mod: nn.Module, sd: dict, path, dtype, device) -> None:
    expected = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    check_keys(path, expected, {k: tuple(v.shape) for k, v in sd.items()})
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).to(device)
          for k, v in sd.items() if k in expected}
    mod.load_state_dict(sd, strict=True, assign=True)


# --- write -----------------------------------------------------------------------------------------------


def _scheduler_config(cfg: ModelConfig) -> dict:
    # like the released configs: no timestep_spacing unless the model fixes one (SDXL: leading), so each
    # diffusers scheduler class keeps its own default
    out = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
           "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": "scaled_linear",
           "num_train_timesteps": cfg.num_train_timesteps, "prediction_type": cfg.prediction_type,
           "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}
    if cfg.timestep_spacing:
        out["timestep_spacing"] = cfg.timestep_spacing
    if cfg.zero_terminal_snr:
        out["rescale_betas_zero_snr"] = True
    return out


def _write_tokenizer(d: Path, pad_token: str) -> None:
    """CLIP tokenizer files from open_clip's bundled BPE (the same vocabulary and merges)."""
    bpe = BPE()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in bpe.encoder.items()}
    merges = sorted(bpe.ranks, key=bpe.ranks.get)
    d.mkdir(parents=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))


def save_folder(path, cfg: ModelConfig, modules: dict, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers folder. Written to a temporary sibling and renamed into place, so a failure leaves no
    half-written folder; an existing non-empty target is refused unless it is itself a diffusers folder."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / "model_index.json").is_file():
        raise FileExistsError(f"{path} exists and is not a diffusers folder; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_folder(tmp, cfg, modules, dtype)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_folder(root: Path, cfg: ModelConfig, modules: dict, dtype) -> None:
    import transformers

    def cast(sd):
        return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}

    def component(sub, config, sd, weights_name):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(root / sub / weights_name, cast(sd), {"format": "pt"})

    f = cfg.vae.downsample
    unet_cfg = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
                "sample_size": cfg.size // f, **unet_fmt.diffusers_config(cfg.unet, _pooled_dim(cfg),
                                                                        SIZE_NUMBERS.get(cfg.family, 6))}
    component("unet", unet_cfg, unet_fmt.to_diffusers(modules["unet"].state_dict(), cfg.unet),
              "diffusion_pytorch_model.safetensors")
    vae_cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
               **vae_fmt.diffusers_config(cfg.vae, sample_size=cfg.size)}
    component("vae", vae_cfg, vae_fmt.to_diffusers(modules["vae"].state_dict(), cfg.vae),
              "diffusion_pytorch_model.safetensors")
    index = {"_class_name": {"sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}.get(
                 cfg.family, "StableDiffusionInpaintPipeline" if cfg.unet.in_channels == 9 else "StableDiffusionPipeline"),
             "_diffusers_version": DIFFUSERS_VERSION, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    role = _role(cfg.family)
    for i, (tcfg, sub) in enumerate(zip(cfg.text, text_dirs(cfg))):
        kw = text_fmt.diffusers_config(tcfg, role)
        cls = "CLIPTextModelWithProjection" if sub == "text_encoder_2" else "CLIPTextModel"
        tconf = transformers.CLIPTextConfig(**kw)
        tconf.architectures = [cls]
        component(sub, tconf.to_dict(), text_fmt.to_diffusers(modules["text_encoders"][i].state_dict(), tcfg, role),
                  "model.safetensors")
        tok = sub.replace("text_encoder", "tokenizer")
        _write_tokenizer(root / tok, "!" if tcfg.pad_id == 0 else "<|endoftext|>")
        index[sub] = ["transformers", cls]
        index[tok] = ["transformers", "CLIPTokenizer"]
    if cfg.family == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    elif cfg.family == "sdxl_refiner":  # as the released refiner's model_index.json
        index.update(text_encoder=[None, None], tokenizer=[None, None], force_zeros_for_empty_prompt=False,
                     requires_aesthetics_score=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(cfg), indent=2))
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    (root / "latentdiff_config.json").write_text(cfg.to_json())
