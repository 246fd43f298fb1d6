"""One full-size SD 1.5-architecture U-Net call (random weights), latentdiff vs diffusers, same process.

    python benchmarks/bench_unet_step.py                      # 512x512, batch 2 (one guided step), fp32 both
    python benchmarks/bench_unet_step.py --size 256 --variants ours:fp32 ours:bf16 ours:bf16:cl diffusers:fp32

Both libraries hold the very same weight tensors (diffusers' model is filled from ours through
``latentdiff.weights.diffusers.unet.to_diffusers``). Variants run in rounds, A B C A B C ..., so drift of a noisy
machine hits all of them alike; medians are printed, then each variant's ratio to the last one (the yardstick,
by default diffusers fp32). A variant is ``lib:dtype[:cl][:packed]``: lib ours | diffusers, dtype fp32 | bf16 |
fp16, ``cl`` = channels-last memory format for weights and input, ``packed`` = conv weights prepacked as the
default pipeline runs them (``latentdiff.speed.pack_conv_weights``; ours only). ``--profile VARIANT`` then
profiles one call of that variant and prints where its time goes: convolutions, linear layers, attention and
everything else, each with its share of the time and its achieved GFLOP/s.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _unets import diffusers_twin, random_unet, unet_flops, unet_inputs, variant  # noqa: E402

from latentdiff.config import SD15  # noqa: E402
from latentdiff.speed import pack_conv_weights  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_variant(s: str) -> tuple[str, torch.dtype, bool, bool]:
    lib, dtype, *rest = s.split(":")
    if (lib not in ("ours", "diffusers") or dtype not in DTYPES or not set(rest) <= {"cl", "packed"}
            or (lib == "diffusers" and "packed" in rest)):
        raise SystemExit(f"bad variant {s!r}: want lib:dtype[:cl][:packed], lib ours|diffusers, dtype "
                         f"{sorted(DTYPES)}, packed for ours only")
    return lib, DTYPES[dtype], "cl" in rest, "packed" in rest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size/8)")
    p.add_argument("--batch", type=int, default=2, help="2 = cond + uncond of one guided step")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=["ours:fp32", "diffusers:fp32"])
    p.add_argument("--profile", metavar="VARIANT", help="one of --variants: break one call down by op kind")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = SD15.unet
    specs = [parse_variant(v) for v in a.variants]

    master = random_unet(cfg)
    models = {}
    for name, (lib, dtype, cl, packed) in zip(a.variants, specs):
        ours = variant(master, dtype, cl)
        if packed:  # a copy: the plain variants keep plain weights
            ours = copy.deepcopy(ours)
            if not pack_conv_weights(ours):
                raise SystemExit(f"{name}: oneDNN cannot pack {dtype} conv weights on this CPU")
        models[name] = ours if lib == "ours" else diffusers_twin(ours)

    def call(name):
        lib, dtype, cl, _ = specs[a.variants.index(name)]
        x, t, c = unet_inputs(cfg, a.size, a.batch, dtype, cl)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = models[name](x, t, c) if lib == "ours" else models[name](x, t, c, return_dict=False)[0]
            dt = time.perf_counter() - t0
        return dt, out.float()

    times = {n: [] for n in a.variants}
    outs = {}
    for r in range(a.repeats + 1):
        for n in a.variants:
            dt, outs[n] = call(n)
            if r:  # round 0 warms up allocators and oneDNN kernel caches
                times[n].append(dt)
            print(f"round {r}{' (warm-up)' if not r else ''}: {n} {dt:.2f}s", flush=True)

    flops = unet_flops(cfg, a.size, a.batch)
    ref = a.variants[-1]
    print(f"\nSD 1.5 U-Net, {a.size}x{a.size}, batch {a.batch}, {torch.get_num_threads()} threads, "
          f"{flops / 1e12:.3f} TFLOP per call; median of {a.repeats}")
    print(f"{'variant':<18} {'median s':>9} {'min s':>7} {'TFLOP/s':>8} {'vs ' + ref:>22} {'rel L2 vs ' + ref:>18}")
    for n in a.variants:
        med = statistics.median(times[n])
        rel = (outs[n] - outs[ref]).norm() / outs[ref].norm()
        print(f"{n:<18} {med:9.3f} {min(times[n]):7.3f} {flops / med / 1e12:8.3f} "
              f"{med / statistics.median(times[ref]):21.3f}x {rel.item():18.2e}")
    if a.profile:
        profile(lambda: call(a.profile), unet_flops(cfg, a.size, a.batch, by_op=True))


# op kind of an aten op (profiler name "aten::x" or flop-counter name "aten.x"); the rest is "other"
# (attention first: "baddbmm" contains "addmm")
KINDS = {"conv": ("convolution",), "attention": ("scaled_dot_product", "flash_attention", "bmm"),
         "linear": ("addmm", "aten::mm", "aten.mm")}


def kind_of(op: str) -> str:
    return next((k for k, keys in KINDS.items() if any(key in op for key in keys)), "other")


def profile(call, flops_by_op: dict) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    seconds = dict.fromkeys([*KINDS, "other"], 0.0)
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "mkldnn::")):  # mkldnn::_convolution_pointwise: packed convs
            seconds[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    flops = dict.fromkeys(seconds, 0)
    for op, f in flops_by_op.items():
        flops[kind_of(str(op))] += f
    total = sum(seconds.values())
    print(f"\nwhere the time of one call goes ({total:.2f} s of aten ops, profiled):")
    for k, s in seconds.items():
        rate = f"{flops[k] / s / 1e9:7.1f} GFLOP/s" if flops[k] and s else ""
        print(f"  {k:<10} {s:7.3f} s {100 * s / total:5.1f}%  {flops[k] / 1e9:7.1f} GFLOP {rate}")


if __name__ == "__main__":
    main()
