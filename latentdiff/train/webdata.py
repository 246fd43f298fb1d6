"""WebDataset tar shards: training data streamed from many files, for data that does not fit on one disk.

A shard is a tar whose samples are `<key>.jpg|jpeg|png|webp` plus `<key>.txt` (the caption), the members of one
sample adjacent (the WebDataset convention, as webdataset's ShardWriter or `tar --sort=name` writes them). The
`data` option names shards as brace notation (`/data/train-{000000..000099}.tar`), one `.tar`, a folder holding
`.tar` files, or a stream webdataset opens (`pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -`).
Reading uses the `webdataset` package (`pip install latentdiff[data]`): it opens local files, `pipe:` commands and
URLs and groups tar members by key; the split, shuffle and decoding below are ours, so they are deterministic.

Split, from (seed, epoch): the shard list is shuffled per epoch, process r takes shards r::world, its DataLoader
worker k takes shards k::num_workers of those, and each worker streams its shards through a shuffle buffer seeded
by (seed, epoch, rank, worker). An epoch is one pass over each process's shards; it ends on every process as soon
as one has no batch left (an all-gather of one flag per micro-batch), so DDP never waits for a finished rank.

Resume is exact for the same number of processes and workers: the epoch's stream is rebuilt and its first
`position` micro-batches are read and dropped (decoded, not trained on: a resume costs data loading up to the saved
position, no model compute). Not with shards: aspect-ratio buckets (images are resized and centre- or randomly
cropped to resolution x resolution) and cache_dir.
"""
from __future__ import annotations

import io
import itertools
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import data
from .data import DataError, Record

log = logging.getLogger("latentdiff.train")

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1000  # samples each worker holds to shuffle across shard boundaries (their raw file bytes)


def _webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise ImportError("WebDataset shards need the webdataset package: pip install latentdiff[data]") from e
    return webdataset


def expand_braces(spec: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` lists; groups multiply."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if m is None:
        return [spec]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..")
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [s for item in items for s in expand_braces(spec[: m.start()] + item + spec[m.end():])]


def shard_list(spec: str) -> list[str] | None:
    """The shards `spec` names, in order; None when it names no shards (a builtin dataset or an image folder).
    Raises DataError for a pattern that expands to nothing or to local files that do not exist."""
    remote = spec.startswith("pipe:") or "://" in spec
    if spec.startswith("builtin:") or not (remote or spec.endswith(".tar") or Path(spec).is_dir()):
        return None
    if Path(spec).is_dir():  # a folder holding .tar files is shards; without, an image folder
        return sorted(str(p) for p in Path(spec).glob("*.tar")) or None
    try:
        shards = expand_braces(spec)
    except ValueError as e:
        raise DataError(f"cannot expand the shard pattern {spec!r}: {e}") from e
    if not shards:
        raise DataError(f"the shard pattern {spec} names no shards")
    missing = [] if remote else [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(shards)} shards of {spec} do not exist (first: {missing[0]})")
    return shards


def raw_samples(shards: list[str]) -> Iterator[dict]:
    """Samples as webdataset groups them: {"__key__", "__url__", "<suffix>": bytes, ...}, shard after shard."""
    return _webdataset().tariterators.tarfile_samples([{"url": s} for s in shards])


def decode(sample: dict) -> tuple[Image.Image, str] | None:
    """(image, caption), or None with a warning when the sample has no readable image."""
    name = f"{sample['__url__']}:{sample['__key__']}"
    suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if suffix is None:
        log.warning("skipping sample %s: no image (%s)", name, "/".join(IMAGE_SUFFIXES))
        return None
    try:
        image = Image.open(io.BytesIO(sample[suffix]))
        image.load()  # decodes everything now: a truncated or broken file raises here, not later
    except Exception as e:  # PIL raises many types for broken files
        log.warning("skipping unreadable image %s.%s: %s", name, suffix, e)
        return None
    if "txt" not in sample:
        log.warning("no caption for %s (no %s.txt): training it with the empty prompt", name, sample["__key__"])
    return image, sample.get("txt", b"").decode("utf-8").strip()


def first_records(shards: list[str], tc, world: int) -> list[Record]:
    """Check the options against shards and read the first images (for VAE-mode validation grids and the latent
    scale); every error here comes before any work starts."""
    if tc.buckets:
        raise DataError("aspect-ratio buckets are not supported with WebDataset shards: set buckets=false")
    if tc.cache_dir:
        raise DataError("cache_dir is not supported with WebDataset shards (they are streamed, not indexed)")
    if len(shards) < world:
        raise DataError(f"{len(shards)} shard(s) for {world} processes: every process needs at least one shard")
    n = 256 if tc.mode == "vae" else 1
    records = []
    for sample in raw_samples(shards):
        if (got := decode(sample)) is not None:
            image, caption = got
            records.append(Record(np.asarray(image.convert("RGB")), caption, (image.height, image.width)))
            if len(records) == n:
                return records
    if not records:
        raise DataError(f"the shards of {tc.data} hold no readable image (looked for {'/'.join(IMAGE_SUFFIXES)})")
    return records


def shards_for(shards: list[str], seed: int, epoch: int, rank: int, world: int, worker: int,
               workers: int) -> list[str]:
    """One worker's shards in one epoch: the epoch's shuffled list, split by process, then by worker."""
    order = random.Random(seed * 7919 + epoch).sample(shards, len(shards))
    return order[rank::world][worker::workers]


def shuffled(items: Iterator, rng: random.Random, size: int) -> Iterator:
    """A shuffle buffer: hold `size` items, emit a random one for each new one, then the rest in random order."""
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardStream(torch.utils.data.IterableDataset):
    """One process's samples of epoch `self.epoch`, as dicts like data.ImageDataset's, plus the worker id and its
    count of unreadable images so far (`worker`, `skipped`)."""

    def __init__(self, shards: list[str], resolution: int, seed: int, random_crop: bool, random_flip: bool,
                 rank: int, world: int):
        self.shards, self.resolution, self.seed = shards, resolution, seed
        self.random_crop, self.random_flip, self.rank, self.world = random_crop, random_flip, rank, world
        self.epoch = 0
        self.skipped = 0  # unreadable images met this epoch by this process's workers (main process's view)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = shards_for(self.shards, self.seed, self.epoch, self.rank, self.world, worker, workers)
        rng = random.Random(((self.seed * 1009 + self.epoch) * 1009 + self.rank) * 1009 + worker)
        skipped = 0
        for n, sample in enumerate(shuffled(raw_samples(mine), rng, SHUFFLE_BUFFER)):
            # a key unique to this draw seeds the sample's crop, flip, noise, timestep and caption dropout
            key = (((self.epoch * self.world + self.rank) << 8 | worker) << 28) | n
            got = decode(sample)
            if got is None:
                skipped += 1
                continue
            image, caption = got
            hw = (self.resolution, self.resolution)
            pixels, crop = data.to_tensor(image, hw, self.random_crop, self.random_flip,
                                          data.sample_generator(self.seed, key, data.AUGMENT))
            yield {"index": n, "key": key, "caption": caption, "orig_size": (image.height, image.width),
                   "crop": crop, "hw": hw, "pixels": pixels, "worker": worker, "skipped": skipped}


def epoch_loader(stream: ShardStream, epoch: int, batch_size: int, num_workers: int, skip: int,
                 acc) -> Iterator[dict]:
    """This process's micro-batches of one epoch after the first `skip`; ends on every process together, as soon
    as any process has no full batch left."""
    stream.epoch, stream.skipped = epoch, 0
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, drop_last=True, collate_fn=data.collate,
                                         num_workers=num_workers, generator=torch.Generator().manual_seed(epoch))
    it, seen = iter(loader), {}
    for _ in range(skip):  # resume: replay the epoch's stream up to the saved position
        next(it, None)
    for n in itertools.count():
        batch = next(it, None)
        have = acc.gather(torch.tensor([int(batch is not None)], device=acc.device))
        if not bool(have.all()):
            if n == 0 and skip == 0:  # else every epoch would end at once, forever
                raise DataError(f"a process has no full batch of {batch_size} in its shards in epoch {epoch}: "
                                "use more or bigger shards, or a smaller batch_size")
            return
        for w, s in zip(batch.pop("worker"), batch.pop("skipped")):
            seen[w] = max(seen.get(w, 0), s)
        stream.skipped = sum(seen.values())
        yield batch
