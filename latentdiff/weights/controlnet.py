"""ControlNet files, read and written: the original layout (lllyasviel's cldm ``control_model.*`` keys, or the
same without the prefix), as `.safetensors` or a weights-only `.pth` / `.ckpt`, and diffusers ``ControlNetModel``
folders (config.json + diffusion_pytorch_model.safetensors) or their weights file alone.

The architecture comes from the weights (the U-Net walk of infer.py on the encoder copy, the hint encoder's
conv widths). Head counts are not in the weights: a config we stored in the file's metadata, else diffusers'
config.json, else the preset whose encoder has these shapes, else the published rule (infer.heads_rule).

diffusers names (``convert_controlnet_checkpoint``; shared/reference/wave2-formats.md section 9.2): the encoder
as the U-Net's (weights/diffusers/unet.py), plus
    input_hint_block.0 / .2k / last  <-> controlnet_cond_embedding.conv_in / blocks.{k-1} / conv_out
    zero_convs.N.0                   <-> controlnet_down_blocks.N
    middle_block_out.0               <-> controlnet_mid_block
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
from accelerate import init_empty_weights

from ..config import PRESETS, SD15, UNetConfig
from ..models.controlnet import ControlNet, ControlNetConfig
from .diffusers import unet as unet_fmt
from .infer import UNET_PREFIX, _Shapes, heads_rule, unet_config
from .io import CheckpointError, SafetensorsFile, read_ckpt, write_safetensors
from .layout import CONFIG_KEY, check_keys

log = logging.getLogger("latentdiff")

CONTROL_PREFIX = "control_model."  # lllyasviel's files; diffusers' LDM_CONTROLNET_KEY, ComfyUI's pth_key
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _extra_names(cfg: ControlNetConfig) -> list[tuple[str, str, str]]:
    """(our prefix, diffusers prefix, kind) of the ControlNet's own blocks, for the U-Net rename table."""
    n_hint = 2 * len(cfg.hint_widths)  # convs in input_hint_block, at indices 0, 2, 4, ...
    hint = ["controlnet_cond_embedding.conv_in."] + [f"controlnet_cond_embedding.blocks.{k}." for k in
                                                     range(n_hint - 2)] + ["controlnet_cond_embedding.conv_out."]
    rows = [(f"input_hint_block.{2 * k}.", d, "param") for k, d in enumerate(hint)]
    rows += [(f"zero_convs.{n}.0.", f"controlnet_down_blocks.{n}.", "param") for n in range(_n_skips(cfg.unet))]
    if cfg.unet.middle_block:
        rows.append(("middle_block_out.0.", "controlnet_mid_block.", "param"))
    return rows


def _n_skips(u: UNetConfig) -> int:
    return 1 + len(u.channel_mult) * u.num_res_blocks + len(u.channel_mult) - 1


def describe(u: UNetConfig) -> str:
    """The model family a U-Net config (or a ControlNet's encoder copy) is for, for error messages."""
    family = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(u.context_dim, "a custom model")
    return f"{family} (context width {u.context_dim}, added-embedding width {u.adm_in_channels})"


# --- reading --------------------------------------------------------------------------------------------------


def _open(path: Path) -> tuple[dict, dict, callable, dict]:
    """-> (shapes, metadata, read(key) -> tensor, diffusers config.json or {}) of a file or diffusers folder."""
    config = {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a folder without config.json is not a diffusers ControlNet")
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} (pickled .bin weights are not read; convert them "
                                  "to .safetensors)")
        path = path / WEIGHTS_NAME
    cfg_path = path.parent / "config.json"  # a diffusers weights file inside its folder: its heads are there
    if path.name.startswith("diffusion_pytorch_model.") and cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
        if config.get("_class_name") != "ControlNetModel":
            raise CheckpointError(f"{cfg_path}: _class_name is {config.get('_class_name')!r}, not ControlNetModel")
    if path.suffix in (".pth", ".ckpt", ".pt", ".bin"):
        sd = read_ckpt(path)  # torch.load(weights_only=True)
        return {k: tuple(v.shape) for k, v in sd.items()}, {}, sd.__getitem__, config
    f = SafetensorsFile(path)
    return f.shapes(), f.metadata, f.get, config


def _diffusers_structure(shapes: dict, path) -> UNetConfig:
    """Enough of the encoder's config to rename diffusers keys (block counts, which blocks have attention)."""
    s = _Shapes(shapes, path)
    levels, r = s.count("down_blocks."), s.count("down_blocks.0.resnets.")
    if not levels or not r:
        s.fail("no down_blocks.N.resnets.M keys")
    depth = tuple(int(s.has(f"down_blocks.{i}.attentions.0.")) for i in range(levels))
    return UNetConfig(channel_mult=(1,) * levels, num_res_blocks=r, transformer_depth=depth,
                      transformer_depth_middle=int(s.has("mid_block.attentions.0.")),
                      middle_block=s.has("mid_block."), adm_in_channels=int(s.has("add_embedding.")))


def _hint_widths(shapes: dict, path) -> tuple[int, ...]:
    convs = []
    while f"input_hint_block.{2 * len(convs)}.weight" in shapes:
        convs.append(shapes[f"input_hint_block.{2 * len(convs)}.weight"])
    if len(convs) < 2 or len(convs) % 2:
        raise CheckpointError(f"{path}: input_hint_block has {len(convs)} convs; a ControlNet's hint encoder has "
                              "conv_in, pairs of convs and conv_out (an even number, 8 in released files)")
    return (convs[0][0],) + tuple(c[0] for c in convs[2:-1:2])


def _heads(u: UNetConfig, config: dict) -> dict:
    """Head fields of UNetConfig (not in the weights): diffusers' config.json, a preset's, or the rule."""
    if config:
        from .folder import unet_config_from  # diffusers' head naming quirks live there

        levels = len(config["block_out_channels"])
        d = dict(config, up_block_types=["CrossAttnUpBlock2D"] * levels)
        got = unet_config_from(d)
        return dict(num_heads=got.num_heads, head_channels=got.head_channels)

    def shape_view(c: UNetConfig) -> UNetConfig:
        return replace(c, num_heads=0, head_channels=0, out_channels=0, transformer_depth_output=(), norm_groups=0)

    for preset in PRESETS.values():
        if shape_view(preset.unet) == shape_view(u):
            return dict(num_heads=preset.unet.num_heads, head_channels=preset.unet.head_channels)
    return heads_rule(u.context_dim, u.use_linear_in_transformer)


def _pooled(u: UNetConfig, config: dict) -> int:
    if not u.adm_in_channels:
        return 0
    if config.get("addition_time_embed_dim"):
        return u.adm_in_channels - 6 * config["addition_time_embed_dim"]
    for preset in PRESETS.values():
        if preset.unet.adm_in_channels == u.adm_in_channels and preset.unet.context_dim == u.context_dim:
            return preset.text[-1].projection_dim
    return 0  # unknown: only writing a diffusers config needs it


def read_controlnet(path, dtype: torch.dtype | None = None, device="cpu") -> ControlNet:
    """A ControlNet file or diffusers folder -> ControlNet (eval mode, no grad), tensors cast to `dtype`
    (None: as stored) on `device`. Raises CheckpointError naming the file and the keys for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet {path} does not exist")
    shapes, metadata, read, config = _open(path)
    if config and (config.get("controlnet_conditioning_channel_order", "rgb") != "rgb"
                   or config.get("global_pool_conditions")):
        raise CheckpointError(f"{path}: BGR-ordered or globally pooled (shuffle) ControlNets are not supported")
    names = {k: k for k in shapes}  # our key -> the file's key
    if any(k.startswith(CONTROL_PREFIX) for k in shapes):
        names = {k[len(CONTROL_PREFIX):]: k for k in shapes if k.startswith(CONTROL_PREFIX)}
        others = len(shapes) - len(names)
        if others:  # a whole cldm training checkpoint: the base model's weights come from the pipeline
            log.info("%s: %d tensors outside %s* (the base model's) are not used", path, others, CONTROL_PREFIX)
    diffusers = "controlnet_cond_embedding.conv_in.weight" in names
    if not diffusers and "input_hint_block.0.weight" not in names:
        sample = ", ".join(sorted(shapes)[:5])
        raise CheckpointError(f"{path}: not a ControlNet: no input_hint_block.0.weight ({CONTROL_PREFIX} prefix "
                              f"optional) nor diffusers' controlnet_cond_embedding.conv_in.weight; first keys: "
                              f"{sample}")
    if diffusers:  # rename to ours, with a structure read from the diffusers key names
        rough = _diffusers_structure({k: shapes[v] for k, v in names.items()}, path)
        rough_cn = ControlNetConfig(rough, hint_widths=(0,) * (_count_blocks(names) // 2 + 1))
        try:
            renamed = unet_fmt.from_diffusers(dict(names), rough, _extra_names(rough_cn))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        names = renamed  # our key -> the file's key (from_diffusers renames keys, values ride along)
    ours = {k: shapes[v] for k, v in names.items()}
    cfg = _config(ours, metadata, config, path)
    with init_empty_weights(include_buffers=False):
        model = ControlNet(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing_zero = sorted(k for k in expected if k.startswith(("zero_convs.", "middle_block_out.")) and k not in ours)
    if missing_zero:
        raise CheckpointError(f"{path}: missing zero convs {', '.join(missing_zero[:8])}"
                              f"{' ...' if len(missing_zero) > 8 else ''} ({len(missing_zero)} tensors): a "
                              f"ControlNet has one 1x1 conv per input block ({_n_skips(cfg.unet)}) and one after the "
                              "middle block; the file is incomplete or not a ControlNet")
    check_keys(path, expected, ours)
    sd = {k: _cast(read(names[k]), dtype).to(device) for k in expected}
    model.load_state_dict(sd, strict=True, assign=True)
    model.source = path.name
    return model.eval().requires_grad_(False)


def _count_blocks(names: dict) -> int:
    n = 0
    while f"controlnet_cond_embedding.blocks.{n}.weight" in names:
        n += 1
    return n


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _config(shapes: dict, metadata: dict, config: dict, path) -> ControlNetConfig:
    if CONFIG_KEY in metadata:  # written by us
        try:
            return ControlNetConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: metadata '{CONFIG_KEY}' is not a valid ControlNet config: {e}") from e
    s = _Shapes({UNET_PREFIX + k: v for k, v in shapes.items()}, path)
    context_fallback = 768  # no transformer anywhere: the width is unused
    u = unet_config(s, SD15.unet, context_fallback, encoder_only=True)
    u = replace(u, **_heads(u, config))
    hint = _hint_widths(shapes, path)
    return ControlNetConfig(unet=u, hint_channels=shapes["input_hint_block.0.weight"][1], hint_widths=hint,
                            pooled_dim=_pooled(u, config))


# --- writing --------------------------------------------------------------------------------------------------


def save_controlnet(cn: ControlNet, path, format: str = "single_file", dtype: torch.dtype | None = None) -> None:
    """Write `cn` as a single `.safetensors` in the original layout (keys `control_model.*`, as lllyasviel's files,
    our config in the metadata) or as a diffusers ControlNetModel folder ("diffusers")."""
    sd = {k: _cast(v, dtype) for k, v in cn.state_dict().items()}
    if format == "single_file":
        write_safetensors(path, {CONTROL_PREFIX + k: v for k, v in sd.items()},
                          {CONFIG_KEY: cn.cfg.to_json(), "format": "pt"})
    elif format == "diffusers":
        _save_folder(Path(path), cn.cfg, unet_fmt.to_diffusers(sd, cn.cfg.unet, _extra_names(cn.cfg)))
    else:
        raise ValueError(f"format must be 'single_file' or 'diffusers', got {format!r}")


def diffusers_config(cfg: ControlNetConfig) -> dict:
    """config.json of diffusers' ControlNetModel with the same topology."""
    u = cfg.unet
    if u.adm_in_channels and not cfg.pooled_dim:
        raise ValueError(f"this SDXL-type ControlNet's pooled text width is unknown (adm_in_channels "
                         f"{u.adm_in_channels}); diffusers' config needs it: set ControlNetConfig.pooled_dim")
    kw = unet_fmt.diffusers_config(replace(u, transformer_depth_output=()), cfg.pooled_dim)
    for k in ("out_channels", "up_block_types", "reverse_transformer_layers_per_block"):
        kw.pop(k, None)
    return {"_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION, **kw,
            "conditioning_channels": cfg.hint_channels,
            "conditioning_embedding_out_channels": list(cfg.hint_widths),
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}


def _save_folder(path: Path, cfg: ControlNetConfig, sd: dict) -> None:
    """Written to a temporary sibling, then renamed into place: a failure leaves no half-written folder."""
    if path.exists() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise FileExistsError(f"{path} exists and is not a diffusers folder; refusing to overwrite it")
    config = diffusers_config(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(tmp / WEIGHTS_NAME, sd, {"format": "pt"})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
