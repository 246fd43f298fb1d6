"""Validation during training: previews of the EMA weights (swapped into the trained modules and back), the
U-Net's sample grid through the Pipeline, and the check that every rank holds the same weights."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from .ema import EMA

log = logging.getLogger("latentdiff.train")


@contextmanager
def ema_weights(ema: EMA | None, params: dict[str, torch.nn.Parameter]):
    """The EMA weights in the (unwrapped) trained modules inside the block, the live ones back after it."""
    if ema is None:
        yield
        return
    live = {n: p.detach().clone() for n, p in params.items()}
    ema.copy_to(params)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(live[n])


def validate(trainee, ema: EMA | None, run_dir: Path, step: int) -> Path:
    """The trainee's preview of the EMA weights at this step, as samples/step-<step>.png."""
    out = run_dir / "samples" / f"step-{step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with ema_weights(ema, trainee.params):
        trainee.preview(out)
    log.info("validation grid: %s", out)
    return out


def sample_grid(tc, cfg, parts: dict, device, out: Path, embeddings: dict | None = None) -> None:
    """The validation prompts through the Pipeline (seed 0, the U-Net's dtype: fp32, or the mixed-precision dtype
    of a frozen base under an adapter; the training resolution), as one grid image. embeddings: {token:
    Embedding} usable in the prompts (textual inversion)."""
    from latentdiff.images import image_grid
    from latentdiff.pipeline import Pipeline

    pipe = Pipeline(cfg, parts["unet"], parts["vae"], parts["text_encoders"], device=device,
                    dtype=next(parts["unet"].parameters()).dtype, source=tc.run_name)
    pipe.adapters.embeddings.update(embeddings or {})
    images = pipe(list(tc.validation_prompts), steps=tc.validation_steps, seed=0, progress=False,
                  height=tc.resolution, width=tc.resolution)
    image_grid(images).save(out)


def sync_check(acc, params: dict[str, torch.nn.Parameter], ema: EMA | None, step: int) -> list[float]:
    """A fingerprint (sum, sum of squares) of the trained weights and EMA on every rank; raises if any rank
    differs."""
    tensors = [p.detach().double() for p in params.values()]
    if ema is not None:
        tensors += [s.double() for s in ema.shadow.values()]
    fp = torch.stack([sum(t.sum() for t in tensors), sum((t * t).sum() for t in tensors)]).to(acc.device)
    every = acc.gather(fp[None]).cpu()  # (ranks, 2)
    if not (every == every[0]).all():
        raise RuntimeError(f"ranks hold different weights after step {step}: {every.tolist()}")
    return every[0].tolist()
