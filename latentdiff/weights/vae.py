"""Standalone VAE files (`vae-ft-mse-840000-ema-pruned.safetensors`, `sdxl_vae.safetensors`, a diffusers `vae/`
folder), read into the model's VAE.

Accepted layouts (shared/reference/wave2-formats.md section 6):
  original keys    encoder.* decoder.* quant_conv.* post_quant_conv.*  (248 tensors for the SD VAE)
  prefixed         first_stage_model.* (a VAE cut out of a full checkpoint, or the whole checkpoint)
  diffusers        encoder.down_blocks.* decoder.up_blocks.* ... (AutoencoderKL's names; a folder or its file)
as `.safetensors`, or `.ckpt` / `.pt` read with weights_only. `.ckpt` VAEs also carry training leftovers,
`loss.*` (the discriminator, LPIPS) and `model_ema.decay` / `model_ema.num_updates`: A1111's `load_vae_dict`
drops them, and so do we, naming how many in the log. Any other key is an error.

The scaling factor stays the base model's (SD 0.18215, SDXL 0.13025): a VAE file does not carry one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import VAEConfig
from .diffusers import vae as vae_fmt
from .io import CheckpointError, SafetensorsFile, read_ckpt
from .layout import VAE_PREFIX, check_keys

log = logging.getLogger("latentdiff")

SIBLING_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")  # A1111: a VAE next to the checkpoint


def sibling_vae(model_path) -> Path | None:
    """`x.vae.safetensors` (or .pt / .ckpt) next to the single file `x.safetensors`, A1111's rule 3."""
    p = Path(model_path)
    for suffix in SIBLING_SUFFIXES:
        if (q := p.with_name(p.stem + suffix)).is_file():
            return q
    return None


def _leftover(key: str) -> bool:
    return key.startswith("loss.") or key in ("model_ema.decay", "model_ema.num_updates")


def _open(path: Path):
    """-> (shapes, get(key, dtype)) for a VAE file, or the weights file of a diffusers `vae/` folder."""
    if path.is_dir():
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: a folder without diffusion_pytorch_model.safetensors; not a diffusers "
                                  "vae/ folder")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = read_ckpt(path)
        return path, {k: tuple(v.shape) for k, v in sd.items()}, lambda k, dtype: sd[k].to(dtype)
    f = SafetensorsFile(path)
    return path, f.shapes(), f.get


def read_vae(path, cfg: VAEConfig, vae: nn.Module, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Read the VAE file at `path` for a VAE of config `cfg` -> its state dict in our keys, in `dtype` on `device`,
    checked against `vae`'s keys and shapes (one CheckpointError naming the file and every problem). Nothing is
    loaded here: the caller assigns the result, so a bad file leaves the model as it was."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE file {path} does not exist")
    path, shapes, get = _open(path)
    leftovers = [k for k in shapes if _leftover(k)]
    if any(k.startswith(VAE_PREFIX) for k in shapes):
        others = [k for k in shapes if not k.startswith(VAE_PREFIX) and not _leftover(k)]
        if others:
            log.info("%s: reading its %s* keys as the VAE; %d other keys (a full checkpoint?) are not used", path,
                     VAE_PREFIX, len(others))
        names = {k[len(VAE_PREFIX):]: k for k in shapes if k.startswith(VAE_PREFIX)}
    else:
        names = {k: k for k in shapes if not _leftover(k)}
    if leftovers:
        log.info("%s: %d training leftovers not read (%s ...), as A1111 drops them", path, len(leftovers),
                 leftovers[0])
    if not any(k.startswith("decoder.") for k in names):
        raise CheckpointError(f"{path}: no decoder.* keys: not a VAE file (found {len(shapes)} keys, e.g. "
                              f"{sorted(shapes)[:5]})")
    sd = {k: get(src, dtype) for k, src in names.items()}
    if any(".up_blocks." in k or ".down_blocks." in k for k in sd):  # diffusers' AutoencoderKL names
        try:
            sd = vae_fmt.from_diffusers(sd, cfg)
        except ValueError as e:
            raise CheckpointError(f"{path}: diffusers-layout VAE: {e}") from e
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    check_keys(path, expected, {k: tuple(v.shape) for k, v in sd.items()})
    return {k: v.to(device) for k, v in sd.items()}
