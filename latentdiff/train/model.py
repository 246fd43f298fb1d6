"""Building the models for training, text conditioning, gradient checkpointing and FLOP counting."""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from latentdiff import weights
from latentdiff.config import ModelConfig, load_config
from latentdiff.models.unet import sdxl_vector

from .config import TrainConfig

log = logging.getLogger("latentdiff.train")


def build_model(tc: TrainConfig) -> tuple[ModelConfig, dict]:
    """(config, {"unet", "vae", "text_encoders"}) in fp32 on the CPU: a preset with weights seeded by tc.seed
    (scratch), or a released single file / diffusers folder (fine-tuning)."""
    if tc.init_from:
        p = Path(tc.init_from)
        if p.is_dir():
            from latentdiff.weights.folder import read_folder

            cfg, modules = read_folder(p, prediction_type=tc.prediction_type, dtype=torch.float32)
        else:
            cfg, modules = weights.read_single_file(p, prediction_type=tc.prediction_type, dtype=torch.float32)
        # weights loaded by assignment may be read-only views of the file: give training its own memory
        for m in modules.values():
            for t in list(m.parameters()) + list(m.buffers()):
                t.data = t.data.clone()
    else:
        cfg = load_config(tc.model)
        torch.manual_seed(tc.seed)
        modules = weights.build_modules(cfg, meta=False)
    if tc.prediction_type:
        cfg = replace(cfg, prediction_type=tc.prediction_type)
    if tc.vae_from:
        vcfg, vmods = weights.read_single_file(tc.vae_from, dtype=torch.float32)
        if replace(vcfg.vae, scaling_factor=cfg.vae.scaling_factor) != cfg.vae:  # the scale is the model's
            raise ValueError(f"vae_from {tc.vae_from}: its VAE config {vcfg.vae} differs from the model's {cfg.vae}")
        modules["vae"] = vmods["vae"]
        cfg = replace(cfg, vae=vcfg.vae)  # with the scaling factor measured when the VAE was trained
        for t in modules["vae"].parameters():
            t.data = t.data.clone()
    if tc.zero_terminal_snr is not None:
        cfg = replace(cfg, zero_terminal_snr=tc.zero_terminal_snr)
    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr=true needs prediction_type v_prediction (eps is undefined at SNR 0)")
    return cfg, modules


def tokenize(tokenizer, encoders, captions: list[str], device) -> list[torch.Tensor]:
    """One 77-token chunk per caption and encoder (each pads with its own id): [(B, 77), ...]."""
    return [tokenizer(captions, pad_id=enc.cfg.pad_id).to(device) for enc in encoders]


def encode_ids(encoders, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """context (B, 77, sum of widths) and the last encoder's pooled vector (SDXL: bigG's projected output)."""
    hidden, pooled = [], None
    for enc, i in zip(encoders, ids):
        h, pooled = enc(i)
        hidden.append(h)
    return torch.cat(hidden, dim=-1), pooled


def size_cond(orig_size, crop, target: tuple[int, int], device) -> torch.Tensor:
    """SDXL's (B, 6) size conditioning: original (H, W), crop (top, left), target (H, W) per sample."""
    return torch.tensor([[*o, *c, *target] for o, c in zip(orig_size, crop)], dtype=torch.float32, device=device)


class UNetWithText(nn.Module):
    """The U-Net and its text encoder(s) as one module, so DDP / FSDP wrap both when the text encoder trains.
    Parameter names are ``unet.*`` and ``text_encoders.*``."""

    def __init__(self, unet: nn.Module, text_encoders: nn.ModuleList):
        super().__init__()
        self.unet, self.text_encoders = unet, text_encoders

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: list[torch.Tensor], size: torch.Tensor | None):
        context, pooled = encode_ids(self.text_encoders, ids)
        y = sdxl_vector(pooled.float(), size, self.unet.cfg.adm_in_channels) if size is not None else None
        return self.unet(x, t, context, y)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Recompute every U-Net block's activations in the backward pass (torch.utils.checkpoint) instead of
    storing them. Replaces each block's forward on the instance: module paths (checkpoint keys) are unchanged."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        def fwd(x, emb, context, _inner=block.forward):
            return checkpoint(_inner, x, emb, context, use_reentrant=False)

        block.forward = fwd


def forward_flops(fn, *args) -> int:
    """FLOPs of one call (matmuls and convolutions, as torch.utils.flop_counter counts them)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved FLOP/s of a large square matmul: the peak used for model FLOP utilisation when none is given."""
    n = 4096 if device.type == "cuda" else 512
    # not from the global RNG: it runs after a resume restored the RNG states (network dropout draws from them)
    a = torch.empty(n, n, device=device, dtype=dtype).uniform_(-1, 1, generator=torch.Generator(device).manual_seed(0))
    b = a.T.contiguous()
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)
