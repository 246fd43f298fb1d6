"""Does a trained LoRA learn a concept the base model lacks? The shipped shapes model has never seen the colour
pink (its grammar has 7 colours, its text encoder was trained from scratch on them); a LoRA on U-Net + text
encoder is trained on pink scenes of the shapes grammar, then base and LoRA are scored on pink prompts and on
held-in prompts of the evaluation set.

    python benchmarks/bench_lora_learns.py [--steps 120] [--images 256]

Metric (CLIP-free): the scenes are flat colours on white, so an image's "pink share" is the fraction of its
non-white pixels (RGB distance from white > 60) that lie within 60 of the white-to-pink line, the checker's own
colour rule (shapes.COLOR_TOL). On held-in prompts the shapes checker's "fully correct" rate (latentdiff eval's
metric) says whether the LoRA left the rest of the model alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PINK = np.array((255.0, 120.0, 200.0))


def pink_scenes(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """Single and count scenes of the grammar with their colour replaced by pink (rendered as shapes.render)."""
    from latentdiff.datasets import shapes

    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        kind = ("single", "count")[len(out) % 2]
        objs, caption = shapes.sample_scene(rng, kind)
        color = objs[0].color
        image = np.full((64, 64, 3), 255.0, dtype=np.float32)
        for o in objs:
            alpha = shapes.coverage(o.shape, o.cx, o.cy, o.s)[..., None]
            image = image * (1 - alpha) + PINK * alpha
        out.append((np.round(image).astype(np.uint8), caption.replace(color, "pink")))
    return out


def pink_share(image: np.ndarray) -> float:
    from latentdiff.datasets.shapes import COLOR_TOL

    x = 255.0 - image.reshape(-1, 3).astype(np.float64)  # white -> pixel
    d = 255.0 - PINK
    ink = np.linalg.norm(x, axis=1) > COLOR_TOL
    t = np.clip(x @ d / (d @ d), 0, 1)
    on_line = np.linalg.norm(x - t[:, None] * d, axis=1) < COLOR_TOL
    return float((ink & on_line).sum() / max(ink.sum(), 1))


def score(pipe, pink_prompts: list[str], held_in: list[str]) -> dict:
    from latentdiff.datasets.shapes import check

    pink = [np.asarray(im) for im in pipe(pink_prompts, seed=0, progress=False)]
    held = [np.asarray(im) for im in pipe(held_in, seed=0, progress=False)]
    return {"pink_share": float(np.mean([pink_share(im) for im in pink])),
            "pink_images": float(np.mean([pink_share(im) > 0.5 for im in pink])),
            "held_in_correct": float(np.mean([check(im, c)["correct"] for im, c in zip(held, held_in)]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    a = ap.parse_args()
    from PIL import Image

    import latentdiff
    from latentdiff.datasets.shapes import eval_fixed_captions

    work = Path(a.out or tempfile.mkdtemp(prefix="lora-learns-"))
    data = work / "pink"
    data.mkdir(parents=True, exist_ok=True)
    for i, (im, caption) in enumerate(pink_scenes(a.images, 0)):
        Image.fromarray(im).save(data / f"{i:05d}.png")
        (data / f"{i:05d}.txt").write_text(caption)
    network = "{type: lora, rank: 8, alpha: 8.0, targets: [unet, text_encoder]}"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/train/lora-smoke.yaml"),
           f"--output_dir={work / 'runs'}", "--run_name=pink", f"--init_from={REPO / 'checkpoints/shapes.safetensors'}",
           f"--data={data}", "--resolution=64", f"--steps={a.steps}", "--batch_size=8", "--lr=1e-3",
           "--warmup_steps=10", "--save_every=0", "--log_every=20", f"--network={network}"]
    subprocess.run(cmd, check=True)
    pink_prompts = [c for _, c in pink_scenes(16, 1)]  # other scenes than the training ones
    held_in = eval_fixed_captions()[:24]  # the held-in half: 8 single, 8 count, 8 relation
    pipe = latentdiff.load("shapes")
    base = score(pipe, pink_prompts, held_in)
    pipe.load_lora(work / "runs/pink/pink.safetensors")
    lora = score(pipe, pink_prompts, held_in)
    print(json.dumps({"steps": a.steps, "images": a.images, "base": base, "lora": lora}, indent=1))


if __name__ == "__main__":
    main()
