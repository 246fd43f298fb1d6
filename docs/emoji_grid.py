"""Regenerate docs/emoji-grid.png: 32 emoji names (28 seen in training, the last 4 held out), seed 0, the model's
defaults, each tile labelled with its prompt and `latentdiff eval emoji`'s verdict: OK when the nearest vendored
icon carries that name, "top 5" when one of the 5 nearest names does, else the name of the nearest icon.

    python docs/emoji_grid.py [--model emoji] [--out docs/emoji-grid.png]
"""
from __future__ import annotations

import argparse
import textwrap

import numpy as np
from PIL import Image, ImageDraw

import latentdiff
from latentdiff import evaluate

TILE, LABEL = 128, 40  # pixels per image (64 x 2, nearest) and for its caption below
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
    cols, rows = 8, len(prompts) // 8
    grid = Image.new("RGB", (cols * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(grid)
    recognised = top5 = 0
    for k, (prompt, im) in enumerate(zip(prompts, images)):
        pixels = np.asarray(im.convert("RGB"))
        name = evaluate.emoji_base(prompt)
        rank = gallery.rank(pixels, name)
        recognised += rank == 0
        top5 += rank < 5
        x, y = (k % cols) * TILE, (k // cols) * (TILE + LABEL)
        grid.paste(im.resize((TILE, TILE), Image.NEAREST), (x, y))
        verdict = "OK" if rank == 0 else "(top 5)" if rank < 5 else f"(nearest: {gallery.nearest(pixels)})"
        text = prompt + (" [held out]" if prompt in HELD_OUT else "") + " " + verdict
        draw.multiline_text((x + 2, y + TILE + 1), "\n".join(textwrap.wrap(text, 24)[:3]), fill="black")
    grid.save(a.out)
    print(f"wrote {a.out}: {recognised} of {len(prompts)} nearest to the named emoji, {top5} in the top 5")


if __name__ == "__main__":
    main()
