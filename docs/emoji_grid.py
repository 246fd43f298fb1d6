"""Regenerate docs/emoji-grid.png: 32 emoji names (28 seen in training, the last 4 held out), seed 0, the model's
defaults, each tile labelled with its prompt and `latentdiff eval emoji`'s verdict: OK when the nearest vendored
icon carries that name, "top 5" when one of the 5 nearest names does, else the name of the nearest icon.

    python docs/emoji_grid.py [--model emoji] [--out docs/emoji-grid.png]
"""
from __future__ import annotations

import argparse

import numpy as np
from _grid import labelled_grid

import latentdiff
from latentdiff import evaluate

PROMPTS = [
    "red apple", "rocket", "woman mage, light skin tone", "grinning face", "red heart", "pizza", "cat face",
    "dog face", "sun", "star", "fire", "thumbs up", "thumbs up, medium skin tone", "face with tears of joy",
    "ghost", "alien", "robot", "panda", "banana", "watermelon", "birthday cake", "christmas tree", "house",
    "automobile", "soccer ball", "crown", "rainbow", "pile of poo",
]
HELD_OUT = ["unicorn", "penguin", "strawberry", "fox"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--out", default="docs/emoji-grid.png")
    a = ap.parse_args()
    pipe = latentdiff.load(a.model)
    prompts = PROMPTS + HELD_OUT
    images = pipe(prompts, seed=0, progress=False)
    gallery = evaluate.EmojiGallery()
    labels, recognised, top5 = [], 0, 0
    for prompt, im in zip(prompts, images):
        pixels = np.asarray(im.convert("RGB"))
        rank = gallery.rank(pixels, evaluate.emoji_base(prompt))
        recognised += rank == 0
        top5 += rank < 5
        verdict = "OK" if rank == 0 else "(top 5)" if rank < 5 else f"(nearest: {gallery.nearest(pixels)})"
        labels.append(prompt + (" [held out]" if prompt in HELD_OUT else "") + " " + verdict)
    grid = labelled_grid(images, labels)
    grid.save(a.out)
    print(f"wrote {a.out}: {recognised} of {len(prompts)} nearest to the named emoji, {top5} in the top 5")


if __name__ == "__main__":
    main()
