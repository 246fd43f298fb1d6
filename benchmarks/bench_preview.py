"""Preview decoder vs the VAE decoder it imitates: time per decode (issue #7: the VAE decode costs about three
U-Net steps; a preview after every step must cost far less).

    python benchmarks/bench_preview.py [--size 256] [--repeats 5]

Two cases: the shipped models (64 px, batch 4, their trained preview decoders), and SD 1.5-size (the SD VAE
decoder with random weights against a preview decoder of the same shape with 3 upsamples, random too: only the
cost matters there; `--size` pixels, batch 1). Both sides fp32, the VAE as `Pipeline.decode` runs it (packed convs
on the CPU by default). Medians; ratios preview / VAE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peaks import median_time  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="SD 1.5-size case: image side in pixels")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)

    import latentdiff
    from latentdiff.config import SD15
    from latentdiff.models.preview import PreviewConfig, PreviewDecoder
    from latentdiff.models.vae import AutoencoderKL
    from latentdiff.speed import pack_conv_weights

    print(f"{'case':<28}{'VAE decode s':>14}{'preview s':>12}{'ratio':>9}")
    for name in ("emoji", "shapes"):
        pipe = latentdiff.load(name)
        z = pipe(["red apple", "a blue square"], num_images=2, seed=0, progress=False, output="latent")
        vae_s = median_time(lambda: pipe.decode(z), a.repeats)
        prev_s = median_time(lambda: pipe.preview(z), a.repeats)
        print(f"{name + ' (64 px, batch 4)':<28}{vae_s:14.4f}{prev_s:12.4f}{prev_s / vae_s:8.3f}x", flush=True)

    torch.manual_seed(0)
    vae = AutoencoderKL(SD15.vae).eval().requires_grad_(False)
    pack_conv_weights(vae)
    preview = PreviewDecoder(PreviewConfig(upsamples=3)).eval().requires_grad_(False)
    z = torch.randn(1, 4, a.size // 8, a.size // 8)
    with torch.inference_mode():
        vae_s = median_time(lambda: vae.decode(z), a.repeats)
        prev_s = median_time(lambda: preview(z), a.repeats)
    case = f"SD 1.5 VAE ({a.size} px)"
    print(f"{case:<28}{vae_s:14.4f}{prev_s:12.4f}{prev_s / vae_s:8.3f}x")


if __name__ == "__main__":
    main()
