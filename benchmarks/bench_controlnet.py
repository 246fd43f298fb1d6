"""Per-step cost of one ControlNet: U-Net + ControlNet call vs the bare U-Net call, latentdiff beside diffusers.

    python benchmarks/bench_controlnet.py                  # SD 1.5 architecture, 512x512, batch 2 (one guided step)
    python benchmarks/bench_controlnet.py --size 256 --repeats 3

Random full-size weights (benchmarks/_unets.py); the ControlNet is SD 1.5's (encoder copy, hint encoder
16-32-96-256, zero convs), and diffusers' U-Net and ControlNetModel hold the very same tensors as ours. fp32, no
packing, so both libraries run the same arithmetic. Variants run in rounds (A B C D A B C D ...) so a noisy
machine's drift hits all alike; medians are printed with each library's ControlNet / bare ratio and ours /
diffusers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _unets import diffusers_twin, random_unet, random_weights, unet_flops, unet_inputs  # noqa: E402

from latentdiff.config import SD15  # noqa: E402
from latentdiff.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from latentdiff.weights.controlnet import _extra_names, diffusers_config  # noqa: E402
from latentdiff.weights.diffusers.unet import to_diffusers  # noqa: E402


def random_controlnet(cfg: ControlNetConfig, seed: int = 1) -> ControlNet:
    return random_weights(lambda: ControlNet(cfg), seed)  # zero convs filled too: residuals are not zero


def diffusers_controlnet(ours: ControlNet):
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    kw = {k: v for k, v in diffusers_config(ours.cfg).items() if not k.startswith("_")}
    with init_empty_weights():
        theirs = ControlNetModel(**kw)
    sd = to_diffusers(ours.state_dict(), ours.cfg.unet, _extra_names(ours.cfg))
    theirs.load_state_dict(sd, strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


def controlnet_flops(cfg: ControlNetConfig, size: int, batch: int) -> int:
    """FLOPs of one ControlNet call, counted on the meta device (nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        cn = ControlNet(cfg)
        x = torch.empty(batch, cfg.unet.in_channels, size // 8, size // 8)
        t, ctx = torch.full((batch,), 500.0), torch.empty(batch, 77, cfg.unet.context_dim)
        hint = torch.empty(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cn(x, t, ctx, None, hint)
    return counter.get_total_flops()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="2 = cond + uncond of one guided step")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    unet = random_unet(SD15.unet)
    cn = random_controlnet(ControlNetConfig(unet=SD15.unet))
    dunet, dcn = diffusers_twin(unet), diffusers_controlnet(cn)
    x, t, ctx = unet_inputs(SD15.unet, a.size, a.batch, torch.float32, False)
    hint = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(2))

    def ours_bare():
        return unet(x, t, ctx)

    def ours_cn():
        return unet(x, t, ctx, None, cn(x, t, ctx, None, hint))

    def diffusers_bare():
        return dunet(x, t, ctx, return_dict=False)[0]

    def diffusers_cn():
        down, mid = dcn(x, t, ctx, hint, return_dict=False)
        return dunet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                     return_dict=False)[0]

    variants = {"ours bare U-Net": ours_bare, "ours U-Net + ControlNet": ours_cn,
                "diffusers bare U-Net": diffusers_bare, "diffusers U-Net + ControlNet": diffusers_cn}
    with torch.inference_mode():
        err = ((ours_cn() - diffusers_cn()).abs().max() / diffusers_cn().abs().max()).item()
        times = {k: [] for k in variants}
        for r in range(a.repeats + 1):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    u_flops, c_flops = unet_flops(SD15.unet, a.size, a.batch), controlnet_flops(cn.cfg, a.size, a.batch)
    print(f"SD 1.5 architecture, {a.size}x{a.size}, batch {a.batch}, fp32, {torch.get_num_threads()} threads, "
          f"medians of {a.repeats}; ours vs diffusers with the ControlNet: max rel. diff {err:.1e}")
    print(f"  FLOPs: U-Net {u_flops / 1e12:.3f} T, ControlNet {c_flops / 1e12:.3f} T: "
          f"{(u_flops + c_flops) / u_flops:.2f}x the bare step's arithmetic")
    for k, v in med.items():
        print(f"  {k:32s} {v:7.2f} s   ({', '.join(f'{s:.2f}' for s in times[k])})")
    # per-round ratios of adjacent calls are steadier than ratios of medians when the machine's load drifts
    rounds = {lib: [c / b for b, c in zip(times[f"{lib} bare U-Net"], times[f"{lib} U-Net + ControlNet"])]
              for lib in ("ours", "diffusers")}
    print("  ControlNet / bare per round: " + "; ".join(
        f"{lib} {', '.join(f'{r:.2f}' for r in v)} (median {statistics.median(v):.2f})" for lib, v in rounds.items()))
    ours, theirs = med["ours U-Net + ControlNet"], med["diffusers U-Net + ControlNet"]
    print(f"  ControlNet cost (ratio of medians): ours {ours / med['ours bare U-Net']:.2f}x the bare step, "
          f"diffusers {theirs / med['diffusers bare U-Net']:.2f}x; ours / diffusers with the ControlNet "
          f"{ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
