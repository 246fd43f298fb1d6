"""The README's labelled sample grids (docs/shapes_grid.py, docs/emoji_grid.py): 64x64 images shown at 2x, 8 per
row, each with up to 3 lines of label below."""
from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw

TILE, LABEL, COLS = 128, 40, 8  # pixels per image (64 x 2, nearest), for its label below; images per row


def labelled_grid(images: list[Image.Image], labels: list[str]) -> Image.Image:
    rows = -(-len(images) // COLS)
    grid = Image.new("RGB", (COLS * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (im, text) in enumerate(zip(images, labels, strict=True)):
        x, y = (k % COLS) * TILE, (k // COLS) * (TILE + LABEL)
        grid.paste(im.resize((TILE, TILE), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + TILE + 1), "\n".join(textwrap.wrap(text, 24)[:3]), fill="black")
    return grid
