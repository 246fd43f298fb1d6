"""Peak throughput of this machine, measured now: matmul and 3x3 convolution in fp32 and bf16.

Shapes are the U-Net's own (320 channels, 2 x 32 x 32 latents at 256 px; 1024 x 1280 x 1280 matmuls), so the
peaks are what this model could reach here, and model FLOP utilisation (MFU) = achieved / peak.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn, after one warm-up call (oneDNN picks and caches its kernels;
    convs pack)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rate(fn, flops: float, repeats: int) -> float:
    return flops / median_time(fn, repeats)


def measure_peaks(repeats: int = 5) -> dict[str, float]:
    """{"matmul_fp32", "matmul_bf16", "conv_fp32", "conv_bf16"} in FLOP/s (medians)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(2048, 1280, generator=g).to(dtype)
        b = torch.randn(1280, 1280, generator=g).to(dtype)
        x = torch.randn(2, 320, 64, 64, generator=g).to(dtype).to(memory_format=torch.channels_last)
        w = torch.randn(320, 320, 3, 3, generator=g).to(dtype).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            out[f"matmul_{name}"] = _rate(lambda: a @ b, 2 * 2048 * 1280 * 1280, repeats)
            out[f"conv_{name}"] = _rate(lambda: F.conv2d(x, w, padding=1), 2 * 2 * 320 * 64 * 64 * 320 * 9, repeats)
    return out


if __name__ == "__main__":
    for k, v in measure_peaks().items():
        print(f"{k:12s} {v / 1e9:8.1f} GFLOP/s")
