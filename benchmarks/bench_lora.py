"""LoRA cost (issue #23): load + merge of a rank-32 kohya LoRA of SD 1.5 size, beside diffusers'
`load_lora_weights` + `fuse_lora` measured in the same run, and the step time with the LoRA merged vs without.

    python benchmarks/bench_lora.py [--rounds 3] [--steps 4] [--size 256]

The model is bench_vs_diffusers.py's random SD 1.5 (written once to its cache); the LoRA (U-Net attention and
feed-forward Linears, text-encoder q/k/v/out/fc1/fc2, rank 32, alpha 16) is random too. Medians of the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_vs_diffusers import CACHE, PROMPT, setup  # noqa: E402


def lora_file(path: Path) -> Path:
    import lora_files as lf
    from safetensors.torch import save_file

    from latentdiff.config import SD15
    from latentdiff.weights import build_modules

    if not path.is_file():
        modules = build_modules(SD15)  # meta: shapes only

        class Meta:  # what lora_files.ours_kohya reads
            unet, text_encoders = modules["unet"], modules["text_encoders"]

        keep = lambda t: t.part != "unet" or ".transformer_blocks." in t.module  # noqa: E731
        sd = lf.ours_kohya(Meta, keep, 0, rank=32, alpha=16.0)
        save_file({k: torch.randn(v.shape) * 0.01 if v.dim() else v for k, v in sd.items()}, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(2)
    single, folder = CACHE / "sd15-random.safetensors", CACHE / "sd15-random-diffusers"
    if not single.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        setup(single, folder)
    lora = lora_file(CACHE / "lora-r32.safetensors")

    import diffusers

    import latentdiff

    pipe = latentdiff.load(single)
    run = dict(steps=a.steps, height=a.size, width=a.size, sampler="euler", output="latent", progress=False)
    pipe(PROMPT, **run)  # warm-up: packs the convs
    ours, steps = [], {"base": [], "lora": []}
    for _ in range(a.rounds):
        t = time.perf_counter()
        pipe.load_lora(lora, 0.8)
        ours.append(time.perf_counter() - t)
        for name in ("lora", "base"):
            t = time.perf_counter()
            pipe(PROMPT, **run)
            steps[name].append((time.perf_counter() - t) / a.steps)
            if name == "lora":
                pipe.unload_lora()
    dpipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=pipe.dtype, local_files_only=True)
    theirs = []
    for _ in range(a.rounds):
        t = time.perf_counter()
        dpipe.load_lora_weights(str(lora), adapter_name="x")
        dpipe.fuse_lora(lora_scale=0.8)
        theirs.append(time.perf_counter() - t)
        dpipe.unfuse_lora()
        dpipe.unload_lora_weights()
    m = statistics.median
    cpu = "AVX-512-bf16" if "avx512_bf16" in open("/proc/cpuinfo").read() else "AVX2"
    print(f"CPU {cpu}, dtype {pipe.dtype}, {a.size} px, {a.rounds} rounds")
    print(f"load + merge rank-32 LoRA: ours {m(ours):.2f} s, diffusers load_lora_weights + fuse_lora "
          f"{m(theirs):.2f} s, ratio {m(ours) / m(theirs):.2f}x")
    print(f"s/step: base {m(steps['base']):.3f}, merged LoRA {m(steps['lora']):.3f}, "
          f"ratio {m(steps['lora']) / m(steps['base']):.3f}")


if __name__ == "__main__":
    main()
