"""Memory of one training step: a LoRA on the frozen U-Net (train/lora.py) beside a full fine-tune, on SD 1.5's
U-Net topology with seeded random weights (fp32, CPU, batch 1, 77-token context).

    python benchmarks/bench_lora_train_memory.py                       # SD 1.5 size: frozen + LoRA
    python benchmarks/bench_lora_train_memory.py --channels 160 --variants frozen,lora,full

Each variant runs in a fresh process (peak RSS is per process): two optimizer steps of AdamW (the second holds
the optimizer state) on a squared-output loss. Variants:
  frozen  the same forward / backward with no trainable weight (the latents require grad): weights + activations
  lora    kohya's LoRA (rank 16, U-Net attention blocks): adds the adapter, its grads and two Adam moments
  full    every U-Net weight trains: weights + grads + two Adam moments (4x the weights) + activations
The issue's bound: a LoRA step holds at most 1.3x the frozen weights plus the activations, i.e.
peak(lora) - start <= 1.3 W + (peak(frozen) - start - W), with start the RSS before the model is built.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 1e9


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(variant: str, channels: int, latent: int, rank: int) -> dict:
    import torch

    from _unets import random_unet
    from latentdiff.config import SD15
    from latentdiff.train.config import NetworkConfig
    from latentdiff.train.lora import LoRANetwork

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    start = rss()
    unet = random_unet(replace(SD15.unet, model_channels=channels))
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, SD15.unet.context_dim, generator=torch.Generator().manual_seed(1))
    if variant == "full":
        params = list(unet.requires_grad_(True).parameters())
    elif variant == "lora":
        net = LoRANetwork(unet, [], NetworkConfig(type="lora", rank=rank, alpha=rank))
        net.attach()
        params = list(net.parameters())
    else:
        params = []
        x.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6) if params else None
    built = rss()
    for _ in range(2):
        loss = unet(x, torch.tensor([500.0]), ctx).float().pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": variant, "weights": weights, "trainable": sum(p.numel() for p in params), "start": start,
            "built": built, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=320, help="model_channels (SD 1.5: 320)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--variants", default="frozen,lora")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run(a.one, a.channels, a.latent, a.rank)))
        return
    res = {}
    for v in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", v, "--channels", str(a.channels), "--latent",
                              str(a.latent), "--rank", str(a.rank)], capture_output=True, text=True, check=True)
        res[v] = json.loads(out.stdout.splitlines()[-1])
    w = next(iter(res.values()))["weights"]
    print(f"U-Net model_channels={a.channels}: {w / GB:.2f} GB fp32 weights; latents {a.latent}x{a.latent}, batch 1")
    print(f"{'variant':8s} {'trainable':>12s} {'peak RSS':>9s} {'peak - start':>13s} {'/ weights':>9s}")
    for v, r in res.items():
        used = r["peak"] - r["start"]
        print(f"{v:8s} {r['trainable']:12,d} {r['peak'] / GB:8.2f}G {used / GB:12.2f}G {used / w:9.2f}")
    if "frozen" in res and "lora" in res:
        act = res["frozen"]["peak"] - res["frozen"]["start"] - w
        lora = res["lora"]["peak"] - res["lora"]["start"]
        print(f"activations (frozen - weights): {act / GB:.2f} G; LoRA step = {(lora - act) / w:.3f} x weights + "
              f"activations (bound: 1.3)")


if __name__ == "__main__":
    main()
