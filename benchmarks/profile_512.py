"""Where the time of one full-size SD 1.5 U-Net call and one VAE decode goes, at 512 px and up (issue #29).

    python benchmarks/profile_512.py                                  # U-Net 512 and 768 px, bf16 and fp32; VAE 512
    python benchmarks/profile_512.py --sizes 512 --dtypes bf16 --no-vae

Each case runs as the default pipeline runs it: conv weights prepacked (`latentdiff.speed.pack_conv_weights`;
bf16 is the default on AVX-512-bf16 CPUs, fp32 on AVX2-only ones), seeded random weights (benchmarks/_unets.py),
batch 2 (one guided step) for the U-Net, batch 1 for the decode. One warm-up call (packing, oneDNN's kernel
choice, first-touch pages), then one profiled call (torch.profiler, self time of each aten / mkldnn op, grouped by
kind; FLOPs counted on the meta device with torch.utils.flop_counter). Prints one markdown row per case.
Profiled calls are a few percent slower than plain ones; the shares are what counts.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _unets import random_unet, random_weights, unet_inputs, variant  # noqa: E402

from latentdiff.config import SD15  # noqa: E402
from latentdiff.models.vae import AutoencoderKL  # noqa: E402
from latentdiff.speed import DTYPES, pack_conv_weights, release_freed_memory  # noqa: E402

# op kind by profiler name (first match wins: "flash_attention" before "mm", "group_norm" before "norm")
KINDS = {
    "conv": ("convolution",),
    "attention": ("scaled_dot_product", "flash_attention", "bmm", "baddbmm", "_softmax"),
    "linear": ("addmm", "aten::mm", "aten.mm", "aten::linear"),
    "group_norm": ("group_norm",),
    "layer_norm": ("layer_norm",),
    "elementwise": ("silu", "gelu", "aten::mul", "aten::add", "aten.mul", "aten.add"),
    "copies": ("copy_", "aten::cat", "clone", "contiguous", "upsample", "aten::pad", "constant_pad"),
}


def kind_of(op: str) -> str:
    return next((k for k, keys in KINDS.items() if any(key in op for key in keys)), "other")


def flops_by_kind(module: nn.Module, *args) -> dict[str, int]:
    """FLOPs of module(*args) by op kind, counted on the meta device (nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    out = dict.fromkeys([*KINDS, "other"], 0)
    for op, f in counter.get_flop_counts()["Global"].items():
        out[kind_of(str(op))] += f
    return out


def profile_call(call) -> tuple[float, dict[str, float]]:
    """(wall seconds, {kind: self seconds}) of one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    seconds = dict.fromkeys([*KINDS, "other"], 0.0)
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "mkldnn::")):  # mkldnn::_convolution_pointwise: packed convs
            seconds[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    return wall, seconds


def row(name: str, wall: float, seconds: dict, flops: dict) -> str:
    total = sum(seconds.values())
    cells = []
    for k, s in seconds.items():
        rate = f", {flops[k] / s / 1e9:.0f} GFLOP/s" if flops[k] and s else ""
        cells.append(f"{s:.2f} s ({100 * s / total:.0f}%{rate})")
    return f"| {name} | {wall:.2f} s | " + " | ".join(cells) + " |"


def header() -> str:
    kinds = [*KINDS, "other"]
    return ("| case | wall | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))


def random_vae(seed: int = 0) -> AutoencoderKL:
    return random_weights(lambda: AutoencoderKL(SD15.vae), seed)


def unet_case(master, size: int, dtype: torch.dtype, batch: int) -> str:
    cfg = master.cfg
    unet = copy.deepcopy(variant(master, dtype, channels_last=False))
    pack_conv_weights(unet)
    x, t, c = unet_inputs(cfg, size, batch, dtype, channels_last=False)
    with torch.device("meta"):
        flops = flops_by_kind(type(unet)(cfg), x.to("meta", torch.float32), t.to("meta"), c.to("meta", torch.float32))
    with torch.inference_mode():
        unet(x, t, c)  # warm-up: packs
        release_freed_memory()
        wall, seconds = profile_call(lambda: unet(x, t, c))
    return row(f"U-Net {size} px, batch {batch}, {str(dtype)[6:]}, packed", wall, seconds, flops)


def vae_case(size: int, dtype: torch.dtype) -> str:
    vae = random_vae().to(dtype)
    pack_conv_weights(vae)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.device("meta"):
        flops = flops_by_kind(AutoencoderKL(SD15.vae).decoder, z.to("meta", torch.float32))
    with torch.inference_mode():
        vae.decode(z)
        release_freed_memory()
        wall, seconds = profile_call(lambda: vae.decode(z))
    return row(f"VAE decode {size} px, batch 1, {str(dtype)[6:]}, packed", wall, seconds, flops)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-size", type=int, default=512)
    p.add_argument("--vae-dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--no-unet", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          "self time of each op kind (share of the profiled ops' total, achieved GFLOP/s)\n")
    print(header(), flush=True)
    if not a.no_unet:
        master = random_unet(SD15.unet)
        for size in a.sizes:
            for d in a.dtypes:
                print(unet_case(master, size, DTYPES[d], a.batch), flush=True)
        del master
        gc.collect()
    if not a.no_vae:
        print(vae_case(a.vae_size, DTYPES[a.vae_dtype]), flush=True)


if __name__ == "__main__":
    main()
