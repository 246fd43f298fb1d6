"""Single files (original CompVis / Stability layout), read and written.

A single file is split by key prefix into the U-Net, VAE and text encoder(s) (see layout.py); each part loads
with a prefix strip and a strict check. Modules are built with their parameters on the meta device and take the
file's tensors by assignment, so nothing is initialised twice and an fp16 file stays fp16 (or goes straight to
bf16) with no fp32 detour.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import ModelConfig
from .io import CheckpointError, SafetensorsFile, read_ckpt, read_in_background, write_safetensors
from .layout import (CONFIG_KEY, VAE_PREFIX, build_modules, check_keys, detect, expected_shapes, file_names, parts,
                     resolve_prediction_type, state_dict_of)

log = logging.getLogger("latentdiff")


def load_parts(cfg: ModelConfig, modules: dict, tensors: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Fill the meta-device `modules` strictly from `tensors` (full single-file keys, already in the target dtype
    and on the device), popping each as it is assigned so no tensor is referenced twice. Parts whose prefix is in
    `skip` stay on the meta device (a checkpoint without VAE weights, filled by Pipeline.load_vae)."""
    for prefix, mod in parts(cfg, modules):
        if prefix in skip:
            continue
        mod.load_state_dict({k: tensors.pop(prefix + k) for k in mod.state_dict()}, strict=True, assign=True)


# float8 weights (some SDXL fine-tunes ship the U-Net so) are storage only: no kernel computes in them
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def read_single_file(path, config=None, prediction_type=None, dtype=None, device="cpu", vae_given: bool = False,
                     ema: bool = False):
    """Open a `.safetensors` / `.ckpt` single file -> (resolved ModelConfig, modules dict). A file without VAE
    weights is an error unless `vae_given` (a standalone VAE file comes next); its VAE then stays on the meta
    device for Pipeline.load_vae. `ema`: read the U-Net from the EMA copy a training checkpoint holds
    (`model_ema.*`) instead of its weights. Tensors are cast to `dtype`; with None each keeps its stored dtype,
    except float8, which becomes float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = read_ckpt(path)  # a training checkpoint's "state_dict" level is unwrapped there
        raw, metadata = {k: tuple(v.shape) for k, v in sd.items()}, {}

        def read(key, dtype=None):
            t = sd[key]
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        def stored(key):
            return sd[key].dtype
    else:
        f = SafetensorsFile(path)
        raw, metadata, read = f.shapes(), f.metadata, f.get

        def stored(key):
            return f.entries[key][0]
    names = file_names(raw, ema, path)  # our key -> the file's key
    shapes = {k: raw[src] for k, src in names.items()}

    def get(key, dtype=None):
        src = names[key]
        return read(src, dtype if dtype is not None or stored(src) not in FLOAT8 else torch.float32)

    config_from = None
    if config is not None:
        cfg, config_from = config, "the config argument"
    elif CONFIG_KEY in metadata:
        try:
            cfg = ModelConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: metadata '{CONFIG_KEY}' is not a valid config: {e}") from e
        config_from = "the config stored in the file"
    else:
        cfg = detect(shapes, path)
    no_vae = not any(k.startswith(VAE_PREFIX) for k in shapes)
    if no_vae and not vae_given:
        raise CheckpointError(f"{path}: holds no VAE weights (no {VAE_PREFIX}* keys among its {len(shapes)} "
                              "tensors): pass a standalone VAE file, latentdiff.load(path, vae='vae.safetensors')")
    # each tensor goes to the device as it is read: a GPU load never holds the whole model on the host
    jobs = {k: (lambda k=k: get(k, dtype).to(device)) for k in shapes}
    with read_in_background(jobs) as tensors:
        modules = build_modules(cfg)
        expected = expected_shapes(cfg, modules)
        if no_vae:
            expected = {k: v for k, v in expected.items() if not k.startswith(VAE_PREFIX)}
        check_keys(path, expected, shapes)
        cfg = resolve_prediction_type(cfg, prediction_type, config_from, metadata, get, raw, path)
        read_tensors = tensors()
    log.info("%s: resolved config %s", path, cfg.to_json())
    load_parts(cfg, modules, read_tensors, skip=(VAE_PREFIX,) if no_vae else ())
    return cfg, modules


# --- writing ----------------------------------------------------------------------------------------------


def save_single_file(path, cfg: ModelConfig, modules: dict, dtype: torch.dtype | None = None,
                     extra_metadata: dict | None = None) -> None:
    sd = state_dict_of(cfg, modules)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    write_safetensors(path, sd, {CONFIG_KEY: cfg.to_json(), "format": "pt", **(extra_metadata or {})})
