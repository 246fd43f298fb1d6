"""latentdiff: latent text-to-image diffusion (Stable Diffusion 1.x / 2.x / SDXL), offline.

    import latentdiff
    pipe = latentdiff.load("v1-5-pruned-emaonly.safetensors")
    images = pipe("a photo of an astronaut riding a horse", guidance_scale=7.5, steps=30, seed=0)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .config import ModelConfig, load_config
from .pipeline import Pipeline

__version__ = "0.1.0"
__all__ = ["load", "load_controlnet", "save_controlnet", "from_config", "generate_many", "Pipeline", "ModelConfig",
           "__version__"]

log = logging.getLogger("latentdiff")
DEFAULT_MODEL = "emoji"


def checkpoint_dirs() -> list[Path]:
    """Where shipped model names are looked up: $LATENTDIFF_CHECKPOINTS, ./checkpoints, the repository's."""
    dirs = [Path(p) for p in os.environ.get("LATENTDIFF_CHECKPOINTS", "").split(os.pathsep) if p]
    return dirs + [Path.cwd() / "checkpoints", Path(__file__).resolve().parent.parent / "checkpoints"]


def _find(name: str) -> Path | None:
    for d in checkpoint_dirs():
        if (d / f"{name}.safetensors").is_file():
            return d / f"{name}.safetensors"
    return None


def load(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, prediction_type: str | None = None,
         config: str | ModelConfig | None = None, vae: str | os.PathLike | None = None,
         lora_dir: str | os.PathLike | None = None, embeddings_dir: str | os.PathLike | None = None,
         ema: bool = False) -> Pipeline:
    """Open a model for generation.

    path: a `.safetensors` / `.ckpt` single file, a diffusers folder, or the name of a model in checkpoints/
    (None = the shipped default). prediction_type: "epsilon" | "v_prediction"; None = from the file's config,
    else detected (logged with the reason). config: a preset name, a YAML file or a ModelConfig that overrides
    detection (e.g. "sd21_v", or a custom architecture). dtype: None = the fast path:
    bfloat16 where the hardware runs it natively (CPUs with AVX512-BF16 / AMX, CUDA GPUs with bf16), else
    float32, on the CPU with prepacked conv weights (fp32: ~4e-6 relative from exact, summation order);
    torch.float32 = the exact path, bit for bit diffusers' fp32. vae: a standalone VAE file or diffusers vae/
    folder replacing the model's VAE (see Pipeline.load_vae); None = `<model>.vae.safetensors` (or .pt / .ckpt)
    next to a single file if there is one, as A1111 does, else the model's own.
    lora_dir: where `<lora:NAME:W>` prompt tags find NAME (searched recursively); None = $LATENTDIFF_LORA_DIR,
    then `loras/` next to the model. embeddings_dir: textual-inversion files usable by name in prompts; None =
    $LATENTDIFF_EMBEDDINGS_DIR, then `embeddings/` next to the model, where they exist.
    ema: a training checkpoint's EMA copy of the U-Net (`model_ema.*`) instead of its weights (single files).
    """
    from . import speed, weights
    from .weights import preview
    from .weights.vae import sibling_vae

    exact = dtype == torch.float32
    dtype = speed.default_dtype(device) if dtype is None else dtype
    if isinstance(config, str):
        config = load_config(config)
    if path is None:
        path = DEFAULT_MODEL
    p = Path(path)
    if not p.exists() and not p.suffix:
        p = _find(str(path)) or p
    if p.is_dir():
        from .weights.folder import read_folder

        if ema:
            raise ValueError(f"ema=True: {p} is a diffusers folder, which holds no EMA copy")
        cfg, modules = read_folder(p, config=config, prediction_type=prediction_type, dtype=dtype, device=device)
    elif p.is_file():
        vae = vae or sibling_vae(p)
        cfg, modules = weights.read_single_file(p, config=config, prediction_type=prediction_type, dtype=dtype,
                                                device=device, vae_given=vae is not None, ema=ema)
    else:
        shipped = sorted({f.stem for d in checkpoint_dirs() if d.is_dir() for f in d.glob("*.safetensors")
                          if not f.name.endswith(preview.SUFFIX)})
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: not a file, a diffusers folder or a shipped "
                                f"model name (shipped: {shipped or 'none found'})")
    pipe = Pipeline(cfg, **modules, device=device, dtype=dtype, source=p.name, exact=exact)
    if vae is not None:
        pipe.load_vae(vae)
    pipe.adapters.lora_dirs = [Path(d) for d in (lora_dir, os.environ.get("LATENTDIFF_LORA_DIR")) if d] + [p.parent / "loras"]
    for d in [Path(d) for d in (embeddings_dir, os.environ.get("LATENTDIFF_EMBEDDINGS_DIR")) if d] or [
            p.parent / "embeddings"]:
        if d.is_dir():
            pipe.load_embeddings_dir(d)
        elif embeddings_dir is not None and d == Path(embeddings_dir):
            raise FileNotFoundError(f"embeddings_dir {d} is not a folder")
    if p.is_file() and preview.preview_path(p).is_file():
        pipe.load_preview(preview.preview_path(p))
    return pipe


def load_controlnet(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A ControlNet for `pipe(..., controlnet=cn, control_image=img)`: an original-layout file (lllyasviel's
    `control_*.pth` / `.safetensors`, keys with or without `control_model.`; `.pth` read weights-only) or a
    diffusers ControlNetModel folder or file; the architecture (SD 1.x / 2.x / SDXL, widths) comes from the
    weights. dtype None: as stored; the pipeline moves it to its own device and dtype when it runs."""
    from .weights.controlnet import read_controlnet

    return read_controlnet(path, dtype=dtype, device=device)


def save_controlnet(controlnet, path: str | os.PathLike, format: str = "single_file",
                    dtype: torch.dtype | None = None) -> None:
    """Write a ControlNet: "single_file" = original layout (`control_model.*` keys, one .safetensors),
    "diffusers" = a ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)."""
    from .weights.controlnet import save_controlnet as save

    save(controlnet, path, format, dtype)


def from_config(config: str | ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> Pipeline:
    """A pipeline with seeded random weights (tests, benchmarks, training from scratch)."""
    from . import weights

    cfg = load_config(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    modules = weights.build_modules(cfg, meta=False)
    pipe = Pipeline(cfg, **modules, device=device, dtype=dtype or torch.float32, source=f"{cfg.name} (random)")
    return pipe.to(device, dtype or torch.float32)


def generate_many(pipe: Pipeline, jobs, out_dir, base_seed: int = 0, **kw) -> dict:
    """A prompt list on every process of an accelerate launch, resumable (latentdiff/batch.py)."""
    from .batch import generate_many as run

    return run(pipe, jobs, out_dir, base_seed, **kw)
