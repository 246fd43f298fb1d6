"""Microsoft Fluent Emoji (flat style) as 64x64 RGB images with captions from their names.

The vendored asset `assets/emoji64.npz` is rebuilt from the npm package `@iconify-json/fluent-emoji-flat`
(MIT, Microsoft Corporation) by `build_emoji` (`latentdiff data build emoji`); `load_emoji` reads it offline.
Building needs `npm` (to fetch the tarball) and `cairosvg` (the `data` extra); loading needs only numpy.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "assets"
ASSET = ASSETS / "emoji64.npz"
NPM_PACKAGE = "@iconify-json/fluent-emoji-flat"
SIZE = 64
# Longest first, so "woman-mage-medium-light" strips "medium-light" rather than "light".
SKIN_TONES = ("medium-light", "medium-dark", "light", "medium", "dark")
HELD_OUT_EVERY = 20

LICENSE_TEXT = """\
The images in emoji64.npz are Microsoft Fluent Emoji (flat style), rasterised to 64x64 RGB on white by
latentdiff.datasets.emoji.build_emoji from the npm package @iconify-json/fluent-emoji-flat (version {version}),
which repackages https://github.com/microsoft/fluentui-emoji. Captions are derived from the icon names.

MIT License

Copyright (c) Microsoft Corporation.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def load_emoji(split: str = "all") -> tuple[np.ndarray, list[str]]:
    """Vendored emoji: images uint8 (N, 64, 64, 3) and their captions.

    split: "all", "train" or "held_out" (see `held_out_mask`; the VAE's PSNR is measured on "held_out").
    """
    if split not in ("all", "train", "held_out"):
        raise ValueError(f"split must be 'all', 'train' or 'held_out', got {split!r}")
    with np.load(ASSET, allow_pickle=False) as f:
        images, captions, names = f["images"], f["captions"], f["names"]
    if split != "all":
        keep = held_out_mask(names.tolist()) == (split == "held_out")
        images, captions = images[keep], captions[keep]
    return images, captions.tolist()


def held_out_mask(names: list[str]) -> np.ndarray:
    """(N,) bool: every 20th emoji (sorted by name, skin tones removed) with all its skin-tone variants.

    Holding out whole tone groups keeps near-duplicates of evaluation images out of training.
    """
    known = set(names)
    bases = [_split_tone(n, known)[0] for n in names]
    held = set(sorted(set(bases))[::HELD_OUT_EVERY])
    return np.array([b in held for b in bases])


def caption_from_name(name: str, names: set[str]) -> str:
    """'woman-mage-medium-light' -> 'woman mage, medium-light skin tone'; 'red-apple' -> 'red apple'.

    Tones are worded as in Unicode's names. A tone suffix counts only when the base name has the whole tone
    family, so 'vertical-traffic-light' stays a traffic light.
    """
    base, tone = _split_tone(name, names)
    words = base.replace("-", " ")
    return f"{words}, {tone} skin tone" if tone else words


def _split_tone(name: str, names: set[str]) -> tuple[str, str | None]:
    for tone in SKIN_TONES:
        base = name.removesuffix("-" + tone)
        if base != name and all(f"{base}-{t}" in names for t in SKIN_TONES):
            return base, tone
    return name, None


def build_emoji(out_dir: Path | str = ASSETS, tarball: Path | str | None = None) -> Path:
    """Render every icon of the npm tarball to `out_dir/emoji64.npz` and write its licence beside it.

    tarball: a local `npm pack @iconify-json/fluent-emoji-flat` file; None runs `npm pack` (needs the registry).
    """
    import cairosvg  # the `data` extra; only the builder needs it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if tarball is None:
            done = subprocess.run(["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp],
                                  check=True, capture_output=True, text=True)
            tarball = Path(tmp) / done.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tar:
            icon_set = json.load(tar.extractfile("package/icons.json"))
            version = json.load(tar.extractfile("package/package.json"))["version"]

    svgs = _icon_svgs(icon_set)
    names = sorted(svgs)
    images = np.stack([_rasterise(svgs[n], cairosvg) for n in names])  # (N, 64, 64, 3)
    captions = [caption_from_name(n, set(svgs)) for n in names]
    path = out_dir / ASSET.name
    np.savez_compressed(path, images=images, captions=np.array(captions), names=np.array(names))
    (out_dir / "LICENSE-fluent-emoji").write_text(LICENSE_TEXT.format(version=version))
    return path


def _icon_svgs(icon_set: dict) -> dict[str, str]:
    """name -> standalone SVG document, per the IconifyJSON format (icons, flipped aliases; hidden ones skipped)."""
    default_w, default_h = icon_set.get("width", 16), icon_set.get("height", 16)
    svgs = {}

    def add(name: str, icon: dict, h_flip: bool = False) -> None:
        w, h = icon.get("width", default_w), icon.get("height", default_h)
        body = icon["body"]
        if h_flip:  # mirror about the vertical centre line
            body = f'<g transform="translate({w} 0) scale(-1 1)">{body}</g>'
        svgs[name] = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                      f'width="{SIZE}" height="{SIZE}" viewBox="0 0 {w} {h}">{body}</svg>')

    for name, icon in icon_set["icons"].items():
        if not icon.get("hidden"):
            add(name, icon)
    # Aliases without a transform are duplicate names of the same picture: skip them.
    for name, alias in icon_set.get("aliases", {}).items():
        if alias.get("hFlip") and alias["parent"] in icon_set["icons"]:
            add(name, icon_set["icons"][alias["parent"]], h_flip=True)
    return svgs


def _rasterise(svg: str, cairosvg) -> np.ndarray:
    """SVG -> (64, 64, 3) uint8, alpha-composited on white (non-square view boxes are centred)."""
    from PIL import Image

    png = cairosvg.svg2png(bytestring=svg.encode(), output_width=SIZE, output_height=SIZE)
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
