"""Train a preview decoder (latentdiff/models/preview.py) to imitate a model's own VAE decoder.

    python -m latentdiff.train.preview --model emoji --data builtin:emoji --out checkpoints/emoji.preview.safetensors

Data: the builtin dataset's training images, encoded by the model's VAE (posterior mode, times the scaling
factor: the latents a sampler ends on). Target: the VAE's own decode of those latents, so the preview
approximates the final image, not the dataset. L1 loss, AdamW, cosine decay, random horizontal flips (of
latents and target together). Measures PSNR against the VAE decode on held-out latents (emoji: the held-out
icons; shapes: another seed) before writing the file.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.preview import PreviewConfig, PreviewDecoder
from ..weights.preview import save_preview

# The shipped previews use width 32 (their PSNR is in the model cards); wider was not tried.
WIDTH = 32


def builtin_images(data: str, n: int = 1536) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) uint8 images (N, H, W, 3) of a builtin dataset, at most n for training (encoding and
    decoding them is most of the time: ~10 s per 64 images on one core)."""
    if data == "builtin:emoji":
        from ..datasets.emoji import load_emoji

        train = load_emoji("train")[0]
        keep = np.sort(np.random.default_rng(0).permutation(len(train))[:n])
        return train[keep], load_emoji("held_out")[0]
    if data == "builtin:shapes":
        from ..datasets.shapes import sample_batch

        return sample_batch(n, seed=0)[0], sample_batch(256, seed=1)[0]
    raise ValueError(f"data must be builtin:emoji or builtin:shapes, got {data!r}")


@torch.inference_mode()
def latents_and_targets(vae, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents in the sampler's space (B, C, h, w) and the VAE's decode of them (B, 3, H, W) in [-1, 1], fp32."""
    zs, ys = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encode(x).mode()
        zs.append(z * vae.cfg.scaling_factor)
        ys.append(vae.decode(z).float().clamp(-1, 1))
    return torch.cat(zs), torch.cat(ys)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = F.mse_loss(pred.clamp(-1, 1), target).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train(vae, images: np.ndarray, steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0,
          log_every: int = 100) -> PreviewDecoder:
    torch.manual_seed(seed)
    z, y = latents_and_targets(vae, images)
    cfg = PreviewConfig(latent_channels=z.shape[1], upsamples=round(math.log2(y.shape[-1] // z.shape[-1])),
                        width=WIDTH)
    model = PreviewDecoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(z), (batch,), generator=g)
        zb, yb = z[idx], y[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        zb[flip], yb[flip] = zb[flip].flip(-1), yb[flip].flip(-1)
        loss = F.l1_loss(model(zb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(json.dumps({"step": step, "l1": round(loss.item(), 5)}), flush=True)
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    import latentdiff

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model name in checkpoints/ or a single file")
    p.add_argument("--data", required=True, choices=["builtin:emoji", "builtin:shapes"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args(argv)
    vae = latentdiff.load(a.model, dtype=torch.float32).vae
    train_images, held_out = builtin_images(a.data)
    t0 = time.perf_counter()
    model = train(vae, train_images, steps=a.steps, batch=a.batch, lr=a.lr)
    z, y = latents_and_targets(vae, held_out)
    with torch.inference_mode():
        score = psnr(model(z), y)
    print(f"trained in {time.perf_counter() - t0:.0f} s; PSNR vs the VAE decode on {len(z)} held-out images: "
          f"{score:.2f} dB")
    save_preview(model, a.out, {"psnr_held_out": f"{score:.2f}", "steps": str(a.steps), "data": a.data})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
