"""Step helpers every sampler shares (samplers.py, vp.py): the noise draw, the ODE slope, the ancestral split."""
from __future__ import annotations

import torch


def randn(x, generator):
    # diffusers' randn_tensor: drawn on the generator's device (CPU for reproducible seeds), then moved
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE in VE space (= eps)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split sigma_from -> sigma_to into a deterministic step to sigma_down plus fresh noise of std sigma_up."""
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def setup(x, extra_args):
    return extra_args or {}, x.new_ones([x.shape[0]])  # s_in (B,): sigma per batch element


def report(callback, i, sigma, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})
