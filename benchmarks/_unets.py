"""Shared by the benchmarks: a full-size U-Net with seeded random weights, in latentdiff and in diffusers.

Weights are filled without a random init first (built on the meta device, then ``to_empty``): linear and conv
weights ~ N(0, 1/fan_in), biases 0, norms (1, 0), so activations keep a sane scale (no denormals, no overflow
in bf16) and timings match a trained model's.
"""
from __future__ import annotations

import torch
from torch import nn

from latentdiff.config import UNetConfig
from latentdiff.models.unet import UNetModel

NORMS = (nn.GroupNorm, nn.LayerNorm)


def random_weights(build, seed: int = 0) -> nn.Module:
    """build() on the meta device, then filled: linear / conv weights ~ N(0, 1/fan_in), biases 0, norms (1, 0)
    (zero-initialised layers too, e.g. a ControlNet's zero convs, so nothing is trivially zero)."""
    with torch.device("meta"):
        module = build()
    module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, NORMS):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.zero_()
    return module.eval().requires_grad_(False)


def random_unet(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    return random_weights(lambda: UNetModel(cfg), seed)


def variant(master: UNetModel, dtype: torch.dtype, channels_last: bool) -> UNetModel:
    """A copy of `master` in `dtype` (fp32 without channels_last: `master` itself, no copy)."""
    if dtype == torch.float32 and not channels_last:
        return master
    with torch.device("meta"):
        unet = UNetModel(master.cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sd = {k: v.to(dtype=dtype, memory_format=fmt) if v.ndim == 4 else v.to(dtype)
          for k, v in master.state_dict().items()}
    unet.load_state_dict(sd, strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def diffusers_twin(ours: UNetModel):
    """diffusers' UNet2DConditionModel holding the very same tensors as `ours` (no copy)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from latentdiff.weights.diffusers.unet import diffusers_config, to_diffusers

    with init_empty_weights():
        theirs = UNet2DConditionModel(**diffusers_config(ours.cfg))
    theirs.load_state_dict(to_diffusers(ours.state_dict(), ours.cfg), strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


def unet_inputs(cfg: UNetConfig, size: int, batch: int, dtype: torch.dtype, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size // 8, size // 8, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, cfg.context_dim, generator=g).to(dtype)
    return x, t, context


def unet_flops(cfg: UNetConfig, size: int, batch: int, by_op: bool = False) -> int | dict:
    """FLOPs of one U-Net call (matmuls, convs, attention; counted on the meta device, nothing runs); with
    by_op, {aten op: FLOPs}."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNetModel(cfg)
        x = torch.empty(batch, cfg.in_channels, size // 8, size // 8)
        t = torch.full((batch,), 500.0)
        context = torch.empty(batch, 77, cfg.context_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, context)
    return counter.get_flop_counts()["Global"] if by_op else counter.get_total_flops()
