"""`latentdiff eval shapes | emoji | vae`: how well a model follows its prompts, and how well its VAE reconstructs.

    latentdiff eval shapes [--model shapes] [--seeds 4] [--guidance 1 3 5 7.5] [--steps N] [--sampler S]
                           [--dtype fp32|bf16]
    latentdiff eval emoji [--model emoji] [--seeds 2] [--guidance ...] [--steps N] [--sampler S]
    latentdiff eval vae [--model emoji] [--dtype fp32|bf16]

`eval shapes` generates every caption of `shapes.eval_fixed_captions()` (8 per kind, held-in then held-out)
once per seed, scores each image with the deterministic checker `shapes.check`, and prints, per guidance
scale, the share of images that are fully correct and each attribute's accuracy, held-in vs held-out.
`eval emoji` generates a fixed set of emoji names (held-in and held-out) and counts an image as the named emoji
when, among all 3,145 vendored icons, the nearest one in colour layout (`EmojiGallery.rank`) carries that name (any skin
tone): a pixel-space proxy for "recognisable", blind to anything finer than 4x4 pixels.
`eval vae` prints the VAE's reconstruction PSNR on data the model never trained on: the held-out emoji split,
or 500 held-out shapes scenes.
"""
from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch

from .datasets import shapes

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


# --- emoji: is the image the named emoji? ---------------------------------------------------------------------

EMOJI_EVERY = {False: 25, True: 2}  # every 25th held-in name (61 of 1,515), every 2nd held-out name (40 of 80)
EMOJI_GRID = 16  # icons compared as 16x16 colour layouts (4x4 pixel means)


def emoji_base(caption: str) -> str:
    """'woman mage, light skin tone' -> 'woman mage': every skin tone is the same emoji."""
    return re.sub(r", [a-z-]+ skin tone$", "", caption)


def emoji_eval_names() -> list[tuple[str, bool]]:
    """(name, held_out): every EMOJI_EVERY-th distinct name of each split, sorted; held-in first."""
    from .datasets.emoji import load_emoji

    out = []
    for held_out in (False, True):
        names = sorted({emoji_base(c) for c in load_emoji("held_out" if held_out else "train")[1]})
        out += [(n, held_out) for n in names[::EMOJI_EVERY[held_out]]]
    return out


def _layout(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 64, 64, 3) -> float32 (N, 16 * 16 * 3) in [0, 1]: 4x4 pixel means."""
    n, k = len(images), images.shape[1] // EMOJI_GRID
    return images.reshape(n, EMOJI_GRID, k, EMOJI_GRID, k, 3).mean((2, 4)).reshape(n, -1).astype(np.float32) / 255


class EmojiGallery:
    """All vendored icons (train and held-out) as colour layouts, with their skin-tone-free names."""

    def __init__(self):
        from .datasets.emoji import load_emoji

        images, captions = load_emoji("all")
        self.names = np.array([emoji_base(c) for c in captions])
        self.layouts = _layout(images)

    def distances(self, image: np.ndarray) -> np.ndarray:
        """(N,) squared distances of every icon's colour layout to that of `image` (uint8 (64, 64, 3))."""
        return ((self.layouts - _layout(image[None])) ** 2).sum(1)

    def rank(self, image: np.ndarray, name: str) -> int:
        """0 if the icon nearest to `image` is `name`, else how many other emoji names have an icon nearer than
        `name`'s nearest."""
        if name not in self.names:
            raise ValueError(f"{name!r} is not an emoji name")
        d = self.distances(image)
        return len(set(self.names[d < d[self.names == name].min()]))

    def nearest(self, image: np.ndarray) -> str:
        return str(self.names[self.distances(image).argmin()])


def evaluate_emoji(pipe, names: list[tuple[str, bool]] | None = None, seeds=(0, 1),
                   guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None) -> dict:
    """Generate every (name, held_out) once per seed and rank it against the gallery (see `EmojiGallery.rank`).
    Returns {"results": [{"name", "seed", "held_out", "rank"}], "summary": {"top1" | "top5": {split: fraction}},
    "seconds"}."""
    names = emoji_eval_names() if names is None else list(names)
    gallery, results, start = EmojiGallery(), [], time.perf_counter()
    for seed in seeds:
        images = pipe([n for n, _ in names], seed=seed, guidance_scale=guidance_scale, steps=steps, sampler=sampler,
                      progress=False)
        for (name, held_out), image in zip(names, images, strict=True):
            rank = gallery.rank(np.asarray(image.convert("RGB")), name)
            results.append({"name": name, "seed": seed, "held_out": held_out, "rank": rank})
    summary = {}
    for row, k in (("top1", 1), ("top5", 5)):
        summary[row] = {}
        for split in SPLITS:
            picked = [r["rank"] < k for r in results if split == "all" or r["held_out"] == (split == "held_out")]
            summary[row][split] = sum(picked) / len(picked) if picked else None
    return {"results": results, "summary": summary, "seconds": time.perf_counter() - start}


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
        from .datasets.emoji import load_emoji

        images = load_emoji("held_out")[0]
        return images, f"{len(images)} held-out emoji"
    images = shapes.sample_batch(500, VAE_SEED, "held_out")[0]
    return images, "500 held-out shapes scenes"


def main(argv: list[str] | None = None) -> None:
    import latentdiff

    from .speed import DTYPES

    p = argparse.ArgumentParser(prog="latentdiff eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["shapes", "emoji", "vae"])
    p.add_argument("--model", default=None, help="checkpoint or shipped name (default: shapes / emoji / emoji)")
    p.add_argument("--seeds", type=int, default=None, help="images per caption, seeds 0 .. N-1 (shapes 4, emoji 2)")
    p.add_argument("--guidance", type=float, nargs="+", default=[None], help="one or more guidance scales")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    model = a.model or ("shapes" if a.what == "shapes" else "emoji")
    seeds = range(a.seeds or (4 if a.what == "shapes" else 2))
    pipe = latentdiff.load(model, device=a.device, dtype=DTYPES[a.dtype] if a.dtype else None)

    if a.what == "vae":
        images, what = _held_out_images("emoji" if "emoji" in str(model) else "shapes")
        print(f"VAE of {pipe.source}: PSNR {vae_psnr(pipe.vae, images):.2f} dB on {what} ({pipe.dtype})")
        return
    for g in a.guidance:
        if a.what == "emoji":
            out = evaluate_emoji(pipe, None, seeds, g, a.steps, a.sampler)
            what = f"{len(out['results']) // len(seeds)} emoji names"
        else:
            out = evaluate_shapes(pipe, None, seeds, g, a.steps, a.sampler)
            what = f"{len(out['results']) // len(seeds)} captions"
        print(f"{pipe.source}: guidance {g if g is not None else pipe.cfg.guidance_scale}, "
              f"{a.steps or pipe.cfg.steps} steps {a.sampler or pipe.cfg.sampler}, {pipe.dtype}; "
              f"{what} x {len(seeds)} seeds = {len(out['results'])} images in {out['seconds']:.0f} s")
        print(format_summary(out["summary"]))
