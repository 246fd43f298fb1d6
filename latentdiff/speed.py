"""The fast path: which dtype to run in, and conv weights packed once. Only what measurements pay for.

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
- Prepacked convolution weights (`pack_conv_weights`, what inductor's freezing does, without compiling): eager
  oneDNN reorders every conv weight into its blocked layout on every call; holding the weights in that layout
  once takes a bf16 U-Net call from 1.37 s to 1.05 s (256 x 256, batch 2, medians of 3; the compiled path: 0.98 s)
  for 0.6 s of packing, once; the VAE decode at 256 from 2.0-2.7 s to 1.6 s; at 512 a U-Net call only from
  6.1-6.2 s to 5.8-6.1 s. Linear weights packed alike gained nothing, so only convs are packed. Pipeline packs
  the U-Net and the VAE on the CPU in bf16, on their first call.
- On a CPU without native bf16 (an AVX2-only AMD EPYC, 2 cores) the default is fp32, packed the same way: one
  U-Net call at 256 x 256, batch 2, 5.47 -> 3.12 s (medians of 3), 4.2e-6 relative from the plain fp32 call.
  bf16 there is emulated, 138 s per call, and oneDNN refuses to pack it (cpu_packs).
`dtype=torch.float32` is the exact path: bit-for-bit what the parity tests check (never packed).
"""
from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn


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


def _packed_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # weight is conv.weight in oneDNN's blocked layout; the op takes any input size (the layout was chosen for
    # the first one; SD 1.5 packed at 256 px, batch 2, then a 320 px batch-1 call: 0.96 s, plain 1.17 s)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                  list(conv.dilation), conv.groups, "none", [], "")


# glibc keeps freed heap pages: without handing them back while packing, the packed copies pile up next to the
# freed plain weights. SD 1.5, peak RSS of the first 256-px image: 3.80 GB; with a trim every 64 MB 3.23 GB
# (unpacked: 3.26 GB); a trim after every conv: 3.06 GB, but 0.75 s of trimming.
_TRIM_EVERY = 64 << 20  # bytes of freed plain weights between two release_freed_memory() calls
_freed_since_trim = 0


def _pack_on_first_call(conv: nn.Conv2d, args) -> None:
    """Forward pre-hook: pack conv's weight for the input size of its first call, then run packed from now on."""
    global _freed_since_trim
    conv._pack_hook.remove()
    del conv._pack_hook
    w = conv.weight.detach()
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, list(conv.padding), list(conv.stride),
                                                         list(conv.dilation), conv.groups, list(args[0].shape))
    conv.weight = nn.Parameter(packed, requires_grad=False)  # the plain weight is freed: never held twice
    conv._conv_forward = functools.partial(_packed_conv, conv)
    _freed_since_trim += w.nbytes
    del w
    if _freed_since_trim >= _TRIM_EVERY:
        release_freed_memory()


def _dense_state_dict(conv, state_dict, prefix, local_metadata) -> None:
    if state_dict[prefix + "weight"].is_mkldnn:
        state_dict[prefix + "weight"] = state_dict[prefix + "weight"].to_dense()


@functools.cache
def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN holds conv weights of `dtype` packed on this CPU. bf16 needs AVX512BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2-only CPU such as a Zen 2/3 EPYC gets a RuntimeError from the reorder), so ask once with a 1x1 weight."""
    try:
        torch.ops.mkldnn._reorder_convolution_weight(torch.zeros(1, 1, 1, 1, dtype=dtype), [0, 0], [1, 1], [1, 1], 1,
                                                     [1, 1, 1, 1])
    except (RuntimeError, AttributeError):  # AttributeError: a torch built without oneDNN
        return False
    return True


def pack_conv_weights(module: nn.Module) -> bool:
    """CPU inference only: from its next call on, hold each Conv2d's weight of `module` in oneDNN's blocked layout
    (packed for the input size of that call) instead of reordering it on every call. The weights stay exact
    (`state_dict()` gives them back bit for bit, as plain tensors); `unpack_conv_weights` undoes it. Needs
    weights that train no more: `to()`, `load_state_dict` and autograd do not take packed weights.
    Returns False when `module` was packed already or this CPU cannot pack its dtype (see cpu_packs)."""
    if getattr(module, "_convs_packed", False):  # checked first: Pipeline asks on every call
        return False
    convs = [m for m in module.modules()
             if type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)]
    if not convs or not cpu_packs(convs[0].weight.dtype):
        return False
    for m in convs:
        m._pack_hook = m.register_forward_pre_hook(_pack_on_first_call)
        m._dense_hook = m._register_state_dict_hook(_dense_state_dict)
    module._convs_packed = True
    return True


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them); see _TRIM_EVERY."""
    global _freed_since_trim
    _freed_since_trim = 0
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def unpack_conv_weights(module: nn.Module) -> None:
    """Undo pack_conv_weights: plain weights (bit for bit the originals) and the plain forward again."""
    module.__dict__.pop("_convs_packed", None)
    for m in module.modules():
        for hook in ("_pack_hook", "_dense_hook"):  # _pack_hook: not called since packing
            if hasattr(m, hook):
                getattr(m, hook).remove()
                delattr(m, hook)
        if "_conv_forward" in m.__dict__:
            del m._conv_forward
            m.weight = nn.Parameter(m.weight.to_dense(), requires_grad=False)
