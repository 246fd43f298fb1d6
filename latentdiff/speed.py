"""The fast path: which dtype to run in, conv weights packed once, and where a model runs.

Only what measurements pay for; the numbers are in benchmarks/README.md ("Where the fast path comes from"):
- bf16 where the CPU computes it natively (avx512_bf16 / AMX: oneDNN's bf16 dot products roughly double conv and
  matmul throughput; a U-Net call is 1.6e-2 relative L2 from fp32 on random weights, as diffusers' bf16), else
  fp32: emulated bf16 is tens of times slower.
- channels-last and torch.compile (default mode) do not pay on these CPUs; compile with inductor's weight
  freezing does, at a large compile time and memory cost, so it is opt-in (Pipeline.compile()).
- Prepacked convolution weights (`pack_conv_weights`, what inductor's freezing does, without compiling): eager
  oneDNN reorders every conv weight into its blocked layout on every call; holding them in that layout once
  saves that reorder. Linear weights packed alike gained nothing, so only convs are packed. The pipeline packs
  the U-Net and the VAE on the CPU on their first call (bf16 on AVX-512-bf16, fp32 on AVX2; oneDNN refuses to
  pack emulated bf16, see cpu_packs).
`dtype=torch.float32` is the exact path: bit-for-bit what the parity tests check (never packed).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # command-line names


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


# glibc's mallopt parameters and defaults (malloc.h, malloc/malloc.c)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MMAP_MAX_DEFAULT, _TRIM_DEFAULT = 65536, 128 << 10
_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's dynamic threshold ends up for large tensors
# Freed heap kept for reuse before glibc trims its top, while sampling (the peak-RSS cost of heap_held)
HEAP_HOLD_BYTES = 1 << 30
# Blocks mapped on their own while loading weights and decoding (heap_mapped)
MAPPED_ABOVE_BYTES = 1 << 20
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _mallopt():
    if any(os.environ.get(k) for k in _MALLOC_ENV):  # the user's own malloc settings win
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None


_policies: list[tuple[tuple[int, int], ...]] = []  # the active _malloc_policy blocks' settings, innermost last


@contextlib.contextmanager
def _malloc_policy(device: torch.device, *settings: tuple[int, int]):
    """glibc's mallopt(param, value) for each of `settings` while the block runs on the CPU (`device`; elsewhere
    nothing changes); on exit large blocks go back to mmap (threshold fixed at glibc's dynamic maximum, 32 MB:
    setting any parameter ends the dynamic one), freed heap back to the OS (malloc_trim), and an enclosing
    block's settings apply again (a decode from a sampler callback). Nothing changes where the user set glibc's
    malloc variables, or off glibc. Process-wide while it lasts. Yields whether the settings apply."""
    mallopt = _mallopt() if device.type == "cpu" else None
    if mallopt is None:
        yield False
        return
    for param, value in settings:
        mallopt(param, value)
    _policies.append(settings)
    try:
        yield True
    finally:
        _policies.pop()
        mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
        release_freed_memory()
        for param, value in _policies[-1] if _policies else ():
            mallopt(param, value)


def heap_held(device: torch.device):
    """While sampling: large tensors from glibc's heap, freed heap kept for the next U-Net call.

    glibc maps every block above its (at most 32 MB) mmap threshold afresh and unmaps it on free, so each such
    tensor page-faults all its pages on first touch, in every U-Net call: SD 1.5 at 512 px, a step 4.0 -> 2.6 s
    (benchmarks/README.md "512 px and up"). Not for the VAE decode, see heap_mapped."""
    return _malloc_policy(device, (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, HEAP_HOLD_BYTES))


@contextlib.contextmanager
def heap_mapped(device: torch.device, trim_after: list[nn.Module] = ()):
    """While loading weights and decoding: every block above MAPPED_ABOVE_BYTES its own mapping, unmapped when
    freed, and freed heap handed back to the OS after each module of `trim_after` runs (a hook while the block
    lasts). glibc still serves a request from a free chunk of its heap where one fits (the holes sampling or
    loading left), and keeps that chunk's pages once it is freed again; the trims hand them back. SD 1.5 512-px
    decode after sampling: peak RSS 0.45 -> 0.34 GB above the weights, 30 ms of trimming (benchmarks/README.md)."""
    with _malloc_policy(device, (_M_MMAP_THRESHOLD, MAPPED_ABOVE_BYTES)) as active:
        hooks = [m.register_forward_hook(lambda *_: release_freed_memory()) for m in trim_after] if active else []
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


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


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, offload: bool):
    """With `offload`, a model lives on the CPU and visits `device` only while it runs (text encoders, then U-Net,
    then VAE): peak device memory is the largest model instead of all three."""
    if not offload:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")


@contextlib.contextmanager
def packed(module: nn.Module, device: torch.device, exact: bool, offload: bool):
    """On the CPU, unless exact (or offloading, which moves weights), run `module` with prepacked conv weights
    (pack_conv_weights). Its first run packs, then returns the freed plain weights' memory to the OS."""
    first = device.type == "cpu" and not exact and not offload and pack_conv_weights(module)
    yield
    if first:
        release_freed_memory()


def release_text_encoders(text_encoders: nn.Module) -> None:
    """Free the text encoders' weights (`pipe(..., keep_text_encoders=False)`): once a call's prompts are encoded
    they are not needed until a new prompt comes, and CLIP-L alone is 0.25 GB in bf16 (SDXL's two towers 1.6 GB).
    The modules move to the meta device (shapes kept, storage freed) and the freed heap pages go back to the OS.
    Prompts encoded before stay usable (the pipeline's prompt cache); a new one raises (check_text_encoders)."""
    text_encoders.to("meta")
    release_freed_memory()


def text_encoders_released(text_encoders: nn.Module) -> bool:
    return any(p.is_meta for p in text_encoders.parameters())


def check_text_encoders(text_encoders: nn.Module, what: str) -> None:
    """Raise a clear error where `what` needs text-encoder weights that release_text_encoders freed."""
    if text_encoders_released(text_encoders):
        raise RuntimeError(f"{what} needs the text encoders, whose weights were freed by keep_text_encoders=False; "
                           "load the pipeline again (latentdiff.load) to encode new prompts or to save or move it")
