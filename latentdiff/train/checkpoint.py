"""Training checkpoints: one file per save, `ckpt-<step>.pt`, written atomically, the last K kept.

The file holds everything an exact resume needs: the trained weights, EMA, optimizer (and GradScaler) state,
step, epoch and data position, every rank's RNG states, the resolved training and model configs. It is read
back with `torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary pickles.
"""
from __future__ import annotations

import logging
import os
import random
import re
import signal
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("latentdiff.train")

PATTERN = re.compile(r"ckpt-(\d+)\.pt")
# test hook: SIGKILL this process while writing the checkpoint of this step (after the bytes, before the rename)
KILL_HOOK = "LATENTDIFF_TEST_KILL_DURING_SAVE"


def path_for(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of interrupted writes are not listed)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest(ckpt_dir: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def save(ckpt_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write to a temporary name, fsync, rename (atomic on POSIX), fsync the folder; then drop old ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = path_for(ckpt_dir, step)
    tmp = ckpt_dir / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
        if os.environ.get(KILL_HOOK) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, final)
    fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink()
    return final


def remove_partial(ckpt_dir: Path) -> None:
    """Delete temporary files left by a write that was killed."""
    for p in ckpt_dir.glob(".ckpt-*.pt.tmp") if ckpt_dir.is_dir() else []:
        log.warning("removing %s, left by an interrupted checkpoint write", p)
        p.unlink()


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read training checkpoint {path}: {e}") from e


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA), as tensors and ints only."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
