"""The fast path: which dtype to run in. Only what measurements pay for.

Measured on a 2-core AVX-512-bf16 CPU (no AMX), full-size SD 1.5 U-Net, 256 x 256, batch 2 (one guided step);
see benchmarks/bench_unet_step.py and the README's performance table:
- bf16 instead of fp32: oneDNN's native bf16 dot products (avx512_bf16 / AMX) roughly double conv and matmul
  throughput. A U-Net call is 1.6e-2 relative L2 from fp32 on random weights (diffusers' bf16: the same;
  tests/test_speed.py). Without native bf16 instructions oneDNN emulates bf16 (not measured here), so the
  default stays fp32 there.
  Measured (medians of 4, quiet machine): fp32 2.94 s, bf16 1.35 s per call (0.27 TFLOP/s).
- channels-last does not pay here (bf16 1.41 s, fp32 3.17 s with it), so it is not applied.
- torch.compile (inductor, default mode) does not pay: 103 s to compile, then 1.53 s per bf16 call against
  1.30 s eager (medians of 3). With inductor's weight freezing it does: a U-Net call 1.20 s -> 0.98 s (73 s to
  compile), 1.02-1.07 s per step end to end (Pipeline.compile(), opt-in for its compile time and memory). Freezing
  must be set in inductor's global config while it compiles: `torch.compile(m, options={"freezing": True})`
  compiled without it (35 s, then 1.62 s against 1.39 s eager).
`dtype=torch.float32` is the exact path: bit-for-bit what the parity tests check.
"""
from __future__ import annotations

import functools

import torch


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
