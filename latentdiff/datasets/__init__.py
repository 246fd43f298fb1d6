"""Builders and loaders for the two datasets the shipped models are trained on.

- emoji: Microsoft Fluent Emoji (flat, MIT) at 64x64, vendored under `assets/` (`emoji.load_emoji`).
- shapes: procedural 64x64 scenes with exact captions and a deterministic checker (`shapes`).
"""

from pathlib import Path


def build(name: str) -> Path:
    """Regenerate a vendored dataset asset (`latentdiff data build emoji`); returns the written file."""
    if name == "emoji":
        from .emoji import build_emoji

        return build_emoji()
    # shapes is procedural: nothing to build.
    raise ValueError(f"name must be 'emoji' (the only dataset with a vendored asset), got {name!r}")
