"""`latentdiff eval shapes | vae`: how well a model follows its prompts, and how well its VAE reconstructs.

    latentdiff eval shapes [--model shapes] [--seeds 4] [--guidance 1 3 5 7.5] [--steps N] [--sampler S]
                           [--dtype fp32|bf16]
    latentdiff eval vae [--model emoji] [--dtype fp32|bf16]

`eval shapes` generates every caption of `shapes.eval_fixed_captions()` (8 per kind, held-in then held-out)
once per seed, scores each image with the deterministic checker `shapes.check`, and prints, per guidance
scale, the share of images that are fully correct and each attribute's accuracy, held-in vs held-out.
`eval vae` prints the VAE's reconstruction PSNR on data the model never trained on: the held-out emoji split,
or 500 held-out shapes scenes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from .data import shapes

SPLITS = ("held_in", "held_out", "all")
VAE_SEED = 1234  # stream of the held-out shapes scenes for the VAE's PSNR


def evaluate_shapes(pipe, captions: list[str] | None = None, seeds=(0, 1, 2, 3), guidance_scale: float | None = None,
                    steps: int | None = None, sampler: str | None = None) -> dict:
    """Generate every caption once per seed (one batched call per seed) and score the images.

    pipe: anything called as pipe(list_of_prompts, seed=, guidance_scale=, steps=, sampler=, progress=) that
    returns one PIL image per prompt. None arguments use the model's defaults.
    Returns {"results": [{"caption", "seed", "held_out", "kind", <attribute>: bool, ..., "correct"}],
             "summary": {row: {"held_in" | "held_out" | "all": fraction or None}}, "seconds": float}
    with rows "correct", "<kind>" (fully correct) and "<kind>.<attribute>".
    """
    captions = shapes.eval_fixed_captions() if captions is None else list(captions)
    results, start = [], time.perf_counter()
    for seed in seeds:
        images = pipe(captions, seed=seed, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                      progress=False)
        for caption, image in zip(captions, images, strict=True):
            score = shapes.check(np.asarray(image.convert("RGB")), caption)
            results.append({"caption": caption, "seed": seed, "held_out": shapes.is_held_out(caption), **score})
    return {"results": results, "summary": summarize(results), "seconds": time.perf_counter() - start}


def summarize(results: list[dict]) -> dict[str, dict[str, float | None]]:
    """Accuracy per row and split; None where a split has no image of that kind."""
    rows = {"correct": lambda r: r["correct"]}
    for kind in shapes.KINDS:
        rows[kind] = lambda r, kind=kind: r["correct"] if r["kind"] == kind else None
        for attr in _attributes(results, kind):
            rows[f"{kind}.{attr}"] = lambda r, kind=kind, attr=attr: r[attr] if r["kind"] == kind else None
    table = {}
    for name, value in rows.items():
        table[name] = {}
        for split in SPLITS:
            picked = [value(r) for r in results if split == "all" or r["held_out"] == (split == "held_out")]
            picked = [v for v in picked if v is not None]
            table[name][split] = sum(picked) / len(picked) if picked else None
    return table


def _attributes(results: list[dict], kind: str) -> list[str]:
    """The checker's attribute names for a kind, in its order (everything but the bookkeeping fields)."""
    first = next((r for r in results if r["kind"] == kind), {})
    return [k for k in first if k not in ("caption", "seed", "held_out", "kind", "correct")]


def format_summary(summary: dict) -> str:
    lines = [f"  {'':18}" + "".join(f"{s:>10}" for s in SPLITS)]
    for name, row in summary.items():
        cells = "".join(f"{'-' if v is None else f'{100 * v:.1f}%':>10}" for v in row.values())
        lines.append(f"  {name:18}{cells}")
    return "\n".join(lines)


def vae_psnr(vae, images: np.ndarray, batch_size: int = 100) -> float:
    """Mean per-image PSNR (dB, 8-bit) of VAE round trips (posterior mean) of uint8 images (N, H, W, 3)."""
    param = next(vae.parameters())
    psnrs = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        with torch.inference_mode():
            y = vae.decode(vae.encode(x.to(param.device, param.dtype)).mode()).float().cpu()
        y = ((y.clamp(-1, 1) + 1) * 127.5).round()  # the 8-bit image a user gets
        mse = ((y - (x + 1) * 127.5) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs += (10 * torch.log10(255.0**2 / mse)).tolist()
    return float(np.mean(psnrs))


def _held_out_images(model: str) -> tuple[np.ndarray, str]:
    if model == "emoji":
        from .data.emoji import load_emoji

        images = load_emoji("held_out")[0]
        return images, f"{len(images)} held-out emoji"
    images = shapes.sample_batch(500, VAE_SEED, "held_out")[0]
    return images, "500 held-out shapes scenes"


def main(argv: list[str] | None = None) -> None:
    import latentdiff

    from .cli import DTYPES

    p = argparse.ArgumentParser(prog="latentdiff eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["shapes", "vae"])
    p.add_argument("--model", default=None, help="checkpoint or shipped name (shapes: shapes; vae: emoji)")
    p.add_argument("--seeds", type=int, default=4, help="images per caption (seeds 0 .. N-1)")
    p.add_argument("--guidance", type=float, nargs="+", default=[None], help="one or more guidance scales")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    model = a.model or ("shapes" if a.what == "shapes" else "emoji")
    pipe = latentdiff.load(model, device=a.device, dtype=DTYPES[a.dtype] if a.dtype else None)

    if a.what == "vae":
        images, what = _held_out_images("emoji" if "emoji" in str(model) else "shapes")
        print(f"VAE of {pipe.source}: PSNR {vae_psnr(pipe.vae, images):.2f} dB on {what} ({pipe.dtype})")
        return
    captions = shapes.eval_fixed_captions()
    for g in a.guidance:
        out = evaluate_shapes(pipe, captions, range(a.seeds), g, a.steps, a.sampler)
        print(f"{pipe.source}: guidance {g if g is not None else pipe.cfg.guidance_scale}, "
              f"{a.steps or pipe.cfg.steps} steps {a.sampler or pipe.cfg.sampler}, {pipe.dtype}; "
              f"{len(captions)} captions x {a.seeds} seeds = {len(out['results'])} images in {out['seconds']:.0f} s")
        print(format_summary(out["summary"]))
