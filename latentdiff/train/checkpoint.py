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
from accelerate.utils import gather_object

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


def find_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint `--resume` names ("latest": the newest in ckpt_dir), or None; raises if there is none."""
    if not resume:
        return None
    path = latest(ckpt_dir) if resume == "latest" else Path(resume)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint found (looked in {ckpt_dir})")
    return path


def collect(acc, tc, cfg, trainee, optimizer, ema, step: int, epoch: int, position: int, skipped: int,
            lr_factor: float) -> dict | None:
    """The checkpoint of this step, on the main process (None on the others). Every rank calls it: the RNG
    states come from every rank, and FSDP / ZeRO gather the full weights."""
    rngs = gather_object([rng_state()])
    trained = trainee.state_dict()  # {"model": ..., and the trainee's own entries}
    if not acc.is_main_process:
        return None
    state = {"step": step, "epoch": epoch, "position": position, "config": tc.to_dict(),
             "model_config": cfg.to_json(), "model": trained.pop("model"), "optimizer": optimizer.state_dict(),
             "ema": ema.state_dict() if ema is not None else None, "rng": rngs, "skipped_images": skipped,
             "lr_schedule": {"kind": "warmup+cosine", "warmup_steps": tc.warmup_steps, "steps": tc.steps,
                             "min_lr_ratio": tc.min_lr_ratio, "factor": lr_factor}}
    if acc.scaler is not None:
        state["scaler"] = acc.scaler.state_dict()
    return {**state, **trained}


def restore(state: dict, tc, trainee, optimizer, ema, acc) -> tuple[int, int, int]:
    """Load a checkpoint into the (unwrapped) trainee, the optimizer, the EMA and this rank's RNGs, before
    accelerate's prepare; returns (step, epoch, position). The GradScaler's state is loaded after prepare."""
    if state["config"] != tc.to_dict() and acc.is_main_process:
        changed = {k: (state["config"].get(k), v) for k, v in tc.to_dict().items()
                   if state["config"].get(k) != v and k != "resume"}
        if changed:
            log.warning("resuming with changed options (checkpoint value, now): %s", changed)
    trainee.load_state_dict(state)
    # load_state_dict also restores each group's hyperparameters; the current config's win (a resume with
    # a new lr or weight decay uses them, as the warning above says)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for g, h in zip(optimizer.param_groups, hyper):
        g.update(h)
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rngs = state["rng"]
    set_rng_state(rngs[acc.process_index] if len(rngs) == acc.num_processes else rngs[0])
    return state["step"], state["epoch"], state["position"]
