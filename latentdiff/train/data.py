"""Training data: image folders, the builtin datasets, aspect-ratio buckets, and a resumable epoch plan.

A folder holds images with captions either in same-name `.txt` files or in a `metadata.jsonl` with lines
`{"file_name": "a.png", "text": "..."}` (the Hugging Face imagefolder convention). Builtin datasets:
`builtin:shapes` (latentdiff.datasets.shapes), `builtin:emoji` (latentdiff.datasets.emoji). WebDataset shards are in
`webdata.py`.

Determinism: every sample drawn in an epoch gets a `key` (epoch * N + its position in that epoch's permutation).
All of a sample's randomness (crop, flip, VAE sample, noise, timestep, caption dropout) comes from a generator
seeded by (seed, key), so results do not depend on the number of ranks, workers, micro-batches or on resuming.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("latentdiff.train")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DataError(ValueError):
    """The data cannot be trained on; raised before any work starts."""


@dataclass
class Record:
    source: str | np.ndarray  # file path, or a uint8 (H, W, 3) array for builtin data
    caption: str
    size: tuple[int, int]  # (H, W) of the original image


# independent streams of one sample draw
AUGMENT, NOISE = 0, 1


def sample_generator(seed: int, key: int, stream: int) -> torch.Generator:
    """The generator of one sample draw (see module docstring), for one use (AUGMENT or NOISE)."""
    return torch.Generator().manual_seed((seed * 1_000_000_007 + key) * 2 + stream)


# --- sources ------------------------------------------------------------------------------------------------


def scan_folder(root: str | Path) -> tuple[list[Record], int]:
    """(records, number of unreadable images skipped). Warns per unreadable image and per missing caption."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    meta = {}
    if (root / "metadata.jsonl").is_file():
        for n, line in enumerate((root / "metadata.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    meta[row["file_name"]] = row.get("text", row.get("caption"))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{root / 'metadata.jsonl'} line {n}: needs a JSON object with 'file_name' "
                                    f"and 'text' ({e})") from e
    records, skipped = [], 0
    for p in sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()):
        try:
            with Image.open(p) as im:
                size = (im.height, im.width)
                im.verify()  # reads the whole file and checks its structure (PNG CRCs, truncation)
        except Exception as e:  # PIL raises many types for broken files
            log.warning("skipping unreadable image %s: %s", p, e)
            skipped += 1
            continue
        rel = p.relative_to(root).as_posix()
        caption = meta.get(rel)
        if caption is None and p.with_suffix(".txt").is_file():
            caption = p.with_suffix(".txt").read_text().strip()
        if caption is None:
            log.warning("no caption for %s (no %s, not in metadata.jsonl): training it with the empty prompt",
                        p, p.with_suffix(".txt").name)
            caption = ""
        records.append(Record(str(p), caption, size))
    return records, skipped


def builtin(name: str, n: int, seed: int) -> list[Record]:
    if name == "shapes":
        from latentdiff.datasets.shapes import sample_batch

        images, captions = sample_batch(n, seed, "train")
    elif name == "emoji":
        from latentdiff.datasets.emoji import load_emoji

        images, captions = load_emoji("train")
        images, captions = images[:n], captions[:n]
    else:
        raise DataError(f"unknown builtin dataset {name!r}; allowed: builtin:shapes, builtin:emoji")
    return [Record(im, c, im.shape[:2]) for im, c in zip(images, captions)]


def load_records(data: str, builtin_size: int, seed: int) -> tuple[list[Record], int]:
    """(records, skipped) for a `data` option that is not WebDataset; raises DataError on empty data."""
    if data.startswith("builtin:"):
        records, skipped = builtin(data.split(":", 1)[1], builtin_size, seed), 0
    else:
        records, skipped = scan_folder(data)
    if not records:
        raise DataError(f"dataset {data} is empty: no readable images ({skipped} unreadable skipped; "
                        f"extensions looked for: {sorted(IMAGE_EXTS)})")
    return records, skipped


# --- buckets and transforms ---------------------------------------------------------------------------------


def make_buckets(resolution: int, multiple: int, max_ratio: float) -> list[tuple[int, int]]:
    """(H, W) sizes, multiples of `multiple`, area <= resolution**2, aspect ratio at most max_ratio (NovelAI)."""
    out = {(resolution, resolution)}
    for w in range(multiple, int(resolution * max_ratio) + 1, multiple):
        h = min(resolution * resolution // w // multiple * multiple, int(resolution * max_ratio))
        if h >= multiple and max(h / w, w / h) <= max_ratio:
            out.update({(h, w), (w, h)})
    return sorted(out)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is nearest (in log space) to the image's."""
    r = np.log(size[0] / size[1])
    return int(np.argmin([abs(np.log(h / w) - r) for h, w in buckets]))


def to_tensor(image: Image.Image | np.ndarray, hw: tuple[int, int], random_crop: bool, flip: bool,
              g: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize to cover (H, W), crop (random or centre), maybe flip -> ((3, H, W) in [-1, 1], (top, left))."""
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    h, w = hw
    scale = max(h / im.height, w / im.width)
    rh, rw = max(h, round(im.height * scale)), max(w, round(im.width * scale))
    if (rh, rw) != (im.height, im.width):
        im = im.resize((rw, rh), Image.BICUBIC)
    # draw both numbers always, so a sample's later draws don't depend on the options
    u = torch.rand(3, generator=g)
    top, left = ((int(u[0] * (rh - h + 1)), int(u[1] * (rw - w + 1))) if random_crop
                 else ((rh - h) // 2, (rw - w) // 2))
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8).copy())
    x = x.permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    if flip and u[2] < 0.5:
        x = x.flip(-1)
    return x, (top, left)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style: item (index, key, bucket) -> dict. Pixels are skipped when latents come from a cache."""

    def __init__(self, records: list[Record], buckets: list[tuple[int, int]], seed: int, random_crop: bool,
                 random_flip: bool, load_pixels: bool = True):
        self.records, self.buckets, self.seed = records, buckets, seed
        self.random_crop, self.random_flip, self.load_pixels = random_crop, random_flip, load_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int, int]) -> dict:
        index, key, bucket = item
        r = self.records[index]
        out = {"index": index, "key": key, "caption": r.caption, "orig_size": r.size, "crop": (0, 0),
               "hw": self.buckets[bucket]}
        if self.load_pixels:
            g = sample_generator(self.seed, key, AUGMENT)
            try:
                image = r.source if isinstance(r.source, np.ndarray) else Image.open(r.source)
                out["pixels"], out["crop"] = to_tensor(image, self.buckets[bucket], self.random_crop,
                                                       self.random_flip, g)
            except OSError as e:
                raise DataError(f"cannot decode {r.source} (it passed the startup check): {e}") from e
        return out


def collate(items: list[dict]) -> dict:
    out = {k: [it[k] for it in items] for k in items[0]}
    if "pixels" in out:
        out["pixels"] = torch.stack(out["pixels"])  # (B, 3, H, W)
    out["key"] = torch.tensor(out["key"])
    out["index"] = torch.tensor(out["index"])
    return out


# --- the epoch plan ---------------------------------------------------------------------------------------


def epoch_batches(bucket_of: list[int], batch_size: int, seed: int, epoch: int, rank: int,
                  world: int) -> list[list[tuple[int, int, int]]]:
    """This rank's batches for one epoch, each a list of (index, key, bucket).

    The global plan is the same on every rank: a seeded permutation, grouped by bucket into full batches (the
    remainder is dropped), batches shuffled (with several buckets), then dealt round-robin; every rank gets the same number of batches
    so DDP never waits for a rank that ran out."""
    n = len(bucket_of)
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    by_bucket: dict[int, list[tuple[int, int, int]]] = {}
    for pos, i in enumerate(perm):
        by_bucket.setdefault(bucket_of[i], []).append((i, epoch * n + pos, bucket_of[i]))
    batches = [items[s : s + batch_size] for _, items in sorted(by_bucket.items())
               for s in range(0, len(items) - batch_size + 1, batch_size)]
    # with one bucket the permutation already mixes; keeping batch order then makes k micro-batches of B the
    # same samples as one batch of k*B (gradient accumulation is exact)
    order = torch.randperm(len(batches), generator=g).tolist() if len(by_bucket) > 1 else list(range(len(batches)))
    per_rank = len(batches) // world
    return [batches[order[j]] for j in range(rank, per_rank * world, world)]
