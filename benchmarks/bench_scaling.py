"""How cost grows with work (issue #29.4): time per call and peak RSS at 256 / 512 / 768 px and batch 1 / 2 / 4, in
latentdiff (its default path) and in diffusers fp32, each row measured in the same run, A B A B.

    python benchmarks/bench_scaling.py                          # every row, 4 steps each (hours on 2 cores)
    python benchmarks/bench_scaling.py --rows 256x1 256x2 512x1 --steps 2

Each (size, batch) is one pair of bench_vs_diffusers.py children (own processes: peak RSS = the child's
ru_maxrss) making one image call of `batch` images (one prompt, CFG 7.5, Euler a) after a warm-up call; the
work column is the U-Net's TFLOPs for the call (steps x one guided step, flop_counter) and `s/TFLOP` (the
whole call, prompt encoding and VAE decode included, over those TFLOPs: at few steps the decode weighs) should stay
flat if time grows with FLOPs and not faster. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_diffusers as bvd  # noqa: E402

ALL_ROWS = [f"{s}x{b}" for s in (256, 512, 768) for b in (1, 2, 4)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ALL_ROWS, help="SIZExBATCH, e.g. 512x2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="A B pairs per row")
    p.add_argument("--warmup", type=int, default=1, choices=[0, 1])
    p.add_argument("--diffusers-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--checkpoint", default=None, help="SD 1.5-architecture single file (default: bench_vs_diffusers' "
                   "random weights)")
    p.add_argument("--folder", default=None, help="the same weights as a diffusers folder")
    a = p.parse_args(argv)

    from _unets import unet_flops
    from latentdiff.config import SD15

    checkpoint = Path(a.checkpoint) if a.checkpoint else bvd.CACHE / "sd15-random-fp16.safetensors"
    folder = Path(a.folder) if a.folder else checkpoint.with_name(checkpoint.stem + "-diffusers")
    if not checkpoint.is_file() or not (folder / "model_index.json").is_file():
        raise SystemExit(f"no benchmark weights at {checkpoint}: run benchmarks/bench_vs_diffusers.py once first")
    out_dir = bvd.CACHE / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    print("| size | batch | U-Net TFLOP per call | latentdiff s | diffusers s | ratio | latentdiff s/TFLOP | "
          "diffusers s/TFLOP | latentdiff RSS GB | diffusers RSS GB | RSS ratio |\n|---|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for spec in a.rows:
        size, batch = (int(x) for x in spec.split("x"))
        child = argparse.Namespace(size=size, steps=a.steps, sampler="euler_a", guidance=7.5, warmup=a.warmup,
                                   out_dir=out_dir, device="cpu", batch=batch, compile=False)
        runs = {"ours": [], "diffusers": []}
        for _ in range(a.repeats):
            for side, dtype in (("ours", "auto"), ("diffusers", a.diffusers_dtype)):
                runs[side].append(bvd.run_child(side, child, dtype, checkpoint, folder))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("image_s", "rss_gb")}
               for side, rs in runs.items()}
        tflop = unet_flops(SD15.unet, size, 2 * batch) * a.steps / 1e12
        o, d = med["ours"], med["diffusers"]
        print(f"| {size} | {batch} | {tflop:.1f} | {o['image_s']:.1f} | {d['image_s']:.1f} | "
              f"{o['image_s'] / d['image_s']:.2f}x | {o['image_s'] / tflop:.2f} | {d['image_s'] / tflop:.2f} | "
              f"{o['rss_gb']:.2f} | {d['rss_gb']:.2f} | {o['rss_gb'] / d['rss_gb']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
