"""The fast path: which dtype to run in, and what to do to a loaded pipeline. Only what measurements pay for.

Measured on a 2-core AVX-512-bf16 CPU (no AMX), full-size SD 1.5 U-Net, 256 x 256, batch 2 (one guided step);
see benchmarks/bench_unet_step.py and the README's performance table:
- bf16 instead of fp32: oneDNN's native bf16 dot products (avx512_bf16 / AMX) roughly double conv and matmul
  throughput; a U-Net call stays within 1e-2 relative L2 of fp32 (tests/test_speed.py). Without native bf16
  instructions oneDNN emulates it and bf16 is slower than fp32, so the default is fp32 there.
- channels-last: oneDNN's convolutions work in NHWC; with NCHW tensors every conv reorders its input and output.
  Converting the conv weights once makes every activation flow NHWC.
`dtype=torch.float32` (and no `optimize`) is the exact path: bit-for-bit what the parity tests check.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger("latentdiff")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()  # not Linux: no evidence of native bf16, stay with fp32


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True for x86 CPUs with bf16 dot-product instructions: AVX512_BF16 (Cooper Lake, Zen 4+) or AMX."""
    flags = _cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA with bf16 support, x86 with AVX512_BF16 / AMX),
    else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def channels_last(module: nn.Module) -> nn.Module:
    """Conv weights (and so every activation they produce) in NHWC. Values are untouched. Idempotent."""
    return module.to(memory_format=torch.channels_last)


def optimize(pipe):
    """Apply the measured speed-ups to a loaded Pipeline in place and return it: channels-last U-Net and VAE.

    Calling it twice is harmless. It changes memory layout only, never values, so fp32 output stays within
    float rounding of the exact path (conv algorithms differ between layouts)."""
    channels_last(pipe.unet)
    channels_last(pipe.vae)
    return pipe
