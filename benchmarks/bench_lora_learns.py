"""Does a trained LoRA learn a concept the base model lacks? The shipped shapes model never saw the word "sks"
nor a green circle (every caption with one was held out of its training). A LoRA on U-Net + text encoder is
trained on "a {small|large} sks {position}" images of single green circles, mixed 1:1 with ordinary training
scenes of the grammar (so the rest of the model is kept, as prior preservation would), then base and LoRA are
scored by the shapes checker (latentdiff eval's metric): "sks" prompts against the same caption with "green
circle", and the 24 held-in captions of the evaluation set.

    python benchmarks/bench_lora_learns.py [--steps 120] [--images 128] [--batch_size 8] [--lr 1e-3]

(A first version taught a new colour, pink: it cannot work with this model, whose VAE, trained on the grammar's
7 colours, decodes pink as orange; the LoRA learned exactly the orange the VAE makes of pink.)
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

WORD, MEANING = "sks", "green circle"


def sks_scenes(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """Single green circles of the grammar, captioned with the new word: (image, caption with 'sks')."""
    from latentdiff.datasets import shapes

    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        objs, caption = shapes.sample_scene(rng, "single", held_out=True)
        if MEANING in caption:
            out.append((shapes.render(objs), caption.replace(MEANING, WORD)))
    return out


def score(pipe, sks_prompts: list[str], held_in: list[str]) -> dict:
    from latentdiff.datasets.shapes import check

    sks = [check(np.asarray(im), c.replace(WORD, MEANING)) for im, c in zip(pipe(sks_prompts, seed=0,
                                                                                   progress=False), sks_prompts)]
    held = [check(np.asarray(im), c) for im, c in zip(pipe(held_in, seed=0, progress=False), held_in)]
    return {"sks_correct": float(np.mean([r["correct"] for r in sks])),
            "sks_color_and_shape": float(np.mean([r["color"] and r["shape"] for r in sks])),
            "held_in_correct": float(np.mean([r["correct"] for r in held]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--images", type=int, default=128, help="sks images, and as many ordinary ones")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    a = ap.parse_args()
    from PIL import Image

    import latentdiff
    from latentdiff.datasets.shapes import eval_fixed_captions

    from latentdiff.datasets.shapes import sample_batch

    work = Path(a.out or tempfile.mkdtemp(prefix="lora-learns-"))
    data = work / "sks"
    data.mkdir(parents=True, exist_ok=True)
    images, captions = sample_batch(a.images, 1, "train")  # the grammar as the model knows it
    for i, (im, caption) in enumerate([*sks_scenes(a.images, 0), *zip(images, captions)]):
        Image.fromarray(im).save(data / f"{i:05d}.png")
        (data / f"{i:05d}.txt").write_text(caption)
    network = "{type: lora, rank: 8, alpha: 8.0, targets: [unet, text_encoder]}"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/train/lora-smoke.yaml"),
           f"--output_dir={work / 'runs'}", "--run_name=sks", f"--init_from={REPO / 'checkpoints/shapes.safetensors'}",
           f"--data={data}", "--resolution=64", f"--steps={a.steps}", f"--batch_size={a.batch_size}", f"--lr={a.lr}",
           "--warmup_steps=10", "--save_every=0", "--log_every=20", f"--network={network}"]
    subprocess.run(cmd, check=True)
    sks_prompts = [c for _, c in sks_scenes(16, 1)]  # other scenes than the training ones
    held_in = eval_fixed_captions()[:24]  # the held-in half: 8 single, 8 count, 8 relation
    pipe = latentdiff.load("shapes")
    base = score(pipe, sks_prompts, held_in)
    pipe.load_lora(work / "runs/sks/sks.safetensors")
    lora = score(pipe, sks_prompts, held_in)
    print(json.dumps({"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "images": a.images, "base": base,
                      "lora": lora}, indent=1))


if __name__ == "__main__":
    main()
