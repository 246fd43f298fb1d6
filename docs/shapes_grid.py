"""Regenerate docs/shapes-grid.png: 16 held-in and 16 held-out captions of the evaluation set (6 single, 5 count,
5 relation each), seed 0, the model's defaults, each tile labelled with its caption and the checker's verdict.

    python docs/shapes_grid.py [--model shapes] [--out docs/shapes-grid.png]
"""
from __future__ import annotations

import argparse

import numpy as np
from _grid import labelled_grid

import latentdiff
from latentdiff.datasets import shapes


def pick_captions() -> list[tuple[str, bool]]:
    """(caption, held_out): the first 6 / 5 / 5 captions of each kind, held-in then held-out."""
    captions, k = shapes.eval_fixed_captions(), shapes.EVAL_PER_KIND  # per split, k of each kind in KINDS order
    out = []
    for s, held_out in enumerate((False, True)):
        for j, n in enumerate((6, 5, 5)):  # single, count, relation
            start = (s * len(shapes.KINDS) + j) * k
            out += [(c, held_out) for c in captions[start:start + n]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--out", default="docs/shapes-grid.png")
    a = ap.parse_args()
    pipe = latentdiff.load(a.model)
    picked = pick_captions()
    images = pipe([c for c, _ in picked], seed=0, progress=False)  # seed 0 for every caption, as `eval shapes`
    labels, correct = [], 0
    for (caption, held_out), im in zip(picked, images):
        ok = shapes.check(np.asarray(im), caption)["correct"]
        correct += ok
        labels.append(caption + (" [held out]" if held_out else "") + (" OK" if ok else " (wrong)"))
    grid = labelled_grid(images, labels)
    grid.save(a.out)
    print(f"wrote {a.out}: {correct} of {len(picked)} fully correct")


if __name__ == "__main__":
    main()
