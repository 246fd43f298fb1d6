"""Checkpoint file I/O: memory-mapped `.safetensors` reading with a validated header, safe `.ckpt` reading,
atomic `.safetensors` writing, and a background reader that converts tensors while modules are built.

`.safetensors` are memory-mapped: a tensor whose dtype already matches is a view of the file (copy-on-write), not
a copy.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from latentdiff import speed


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending keys."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# --- safetensors, read ------------------------------------------------------------------------------------


class SafetensorsFile:
    """A memory-mapped .safetensors file. Validates the header against the file size before touching data,
    so a truncated or foreign file fails with a message instead of a crash deep inside a loader."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: header claims {n} bytes but the file has only {size - 8} after the length "
                    "field: truncated, or not a safetensors file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: header is not valid JSON ({e}); not a safetensors file") from e
            if not isinstance(header, dict):
                raise CheckpointError(f"{self.path}: header is not a JSON object; not a safetensors file")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._base = 8 + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, e in header.items():
                try:
                    dtype = _ST_DTYPES[e["dtype"]]
                    shape = tuple(int(s) for s in e["shape"])
                    start, end = (int(o) for o in e["data_offsets"])
                except (KeyError, TypeError, ValueError) as err:
                    raise CheckpointError(f"{self.path}: malformed header entry for key {key!r}: {e!r}") from err
                if self._base + end > size:
                    raise CheckpointError(
                        f"{self.path}: tensor {key!r} ends at byte {self._base + end} but the file has {size} "
                        "bytes: the file is truncated")
                numel = 1
                for s in shape:
                    numel *= s
                if end - start != numel * dtype.itemsize:
                    raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes for shape {shape}")
                self.entries[key] = (dtype, shape, start, end)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._viewed: set[str] = set()  # keys handed out as views of the mapping: their pages are never dropped

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e[1] for k, e in self.entries.items()}

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key``; a view of the mapped file when no conversion is needed (copy-on-write)."""
        src, shape, start, end = self.entries[key]
        convert = dtype is not None and src.is_floating_point and src != dtype
        if end == start:
            return torch.empty(shape, dtype=src)
        a, b = self._base + start, self._base + end
        t = torch.frombuffer(memoryview(self._mm)[a:b], dtype=src).reshape(shape)
        if not convert:
            if a % src.itemsize:
                return t.clone()  # misaligned view: vectorised kernels want aligned data
            self._viewed.add(key)
            return t
        out = t.to(dtype)
        # Converting from the mapping, then dropping the pages read, is faster than reading into a buffer and
        # keeps peak RSS at the converted copy alone (benchmarks/README.md, "Loading"). Only pages wholly inside
        # this tensor are dropped, and not if the key was also handed out as a (writable, copy-on-write) view.
        lo, hi = -(-a // mmap.PAGESIZE) * mmap.PAGESIZE, b // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and key not in self._viewed and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return out


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A pickled .ckpt / .pt, through torch.load(weights_only=True): tensors and plain containers only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs globals outside torch's safe list ({e}). Pickles can "
            "run arbitrary code, so latentdiff never loads them unrestricted. If you trust the file, convert it "
            "once in a sandbox: python -c \"import torch, safetensors.torch as s; "
            "sd = torch.load('IN.ckpt', weights_only=False)['state_dict']; "
            "s.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, 'OUT.safetensors')\""
        ) from e
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic: write to a temporary name in the same folder, fsync, then rename over `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def read_in_background(jobs: dict):
    """Run `jobs` ({name: function returning a tensor}) on one worker thread while the caller goes on building
    modules; yields a function that waits for them and returns {name: tensor}.

    Why: building the modules imports transformers' CLIP (seconds of GIL-bound Python) and converting the weights
    (first-touch page faults and the cast, both outside the GIL) is independent of it, so on 2 cores the two
    overlap. Leaving the block early (an error) stops the worker after
    its current tensor; the block never returns before the worker has ended."""
    stop = threading.Event()

    def run() -> dict:
        out = {}
        for name, job in jobs.items():
            if stop.is_set():
                break
            out[name] = job()
        return out

    # the weights in their own mappings (speed.heap_mapped), not glibc's heap: the conversion's freed buffers
    # would leave holes between them that later allocations fill and keep (the VAE decode at 512 px: +0.3 GB)
    with speed.heap_mapped(torch.device("cpu")), ThreadPoolExecutor(1, thread_name_prefix="latentdiff-read") as pool:
        future = pool.submit(run)
        try:
            yield future.result
        finally:
            stop.set()
