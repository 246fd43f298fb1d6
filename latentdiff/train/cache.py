"""Cache of VAE posteriors and text embeddings: computed once, on the main process, then read by every rank
and reused by later runs with the same model, data and resolution (the file name is a hash of those).

Posteriors (mean, std) are cached rather than latents, so each step still draws a fresh latent sample. With
train_text_encoder the text embeddings change every step, so only the posteriors are cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentdiff.weights import write_safetensors

from . import data
from .model import encode_ids, tokenize

log = logging.getLogger("latentdiff.train")


def fingerprint(tc, cfg, records: list[data.Record], buckets, bucket_of) -> str:
    def source_id(path):
        if path is None:
            return None
        p = Path(path)
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]

    ident = {
        "model": cfg.to_json(), "init_from": source_id(tc.init_from) if tc.init_from and Path(tc.init_from).is_file()
        else tc.init_from, "vae_from": source_id(tc.vae_from), "scratch_seed": None if tc.init_from else tc.seed,
        "data": tc.data, "builtin": [tc.builtin_size, tc.seed] if tc.data.startswith("builtin:") else None,
        "mixed_precision": tc.mixed_precision, "text": not tc.train_text_encoder,
        "records": [[r.source if isinstance(r.source, str) else i, r.caption, list(r.size), buckets[b]]
                    for i, (r, b) in enumerate(zip(records, bucket_of))],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class Cache:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = tensors

    def posterior(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.stack([self.t[f"mean.{i}"] for i in indices]).to(device)  # (B, C, h, w)
        std = torch.stack([self.t[f"std.{i}"] for i in indices]).to(device)
        return mean.float(), std.float()

    def text(self, indices: list[int], dropped: list[bool], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys = ["empty" if d else str(i) for i, d in zip(indices, dropped)]
        context = torch.stack([self.t[f"context.{k}"] for k in keys]).to(device)  # (B, 77, D)
        pooled = torch.stack([self.t[f"pooled.{k}"] for k in keys]).to(device) if "pooled.empty" in self.t else None
        return context, pooled


@torch.no_grad()
def compute(dataset: data.ImageDataset, bucket_of, vae, encoders, tokenizer, batch_size: int, device,
            dtype, text: bool = True) -> dict[str, torch.Tensor]:
    """mean.i / std.i: (C, h, w) posterior of image i; with text, context.i (77, D) [pooled.i (D,)] and .empty."""
    out = {}
    n = len(dataset)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        items = [dataset[(i, 0, bucket_of[i])] for i in idx]
        # images of one bucket share a size and go through the VAE as one batch
        for b in sorted({bucket_of[i] for i in idx}):
            group = [(i, it) for i, it in zip(idx, items) if bucket_of[i] == b]
            post = vae.encode(torch.stack([it["pixels"] for _, it in group]).to(device, dtype))
            for j, (i, _) in enumerate(group):
                out[f"mean.{i}"], out[f"std.{i}"] = post.mean[j].clone(), post.std[j].clone()
        if text:
            context, pooled = encode_ids(encoders, tokenize(tokenizer, encoders, [it["caption"] for it in items],
                                                            device))
            for j, i in enumerate(idx):
                out[f"context.{i}"] = context[j]
                if pooled is not None:
                    out[f"pooled.{i}"] = pooled[j]
    if text:
        context, pooled = encode_ids(encoders, tokenize(tokenizer, encoders, [""], device))
        out["context.empty"] = context[0]
        if pooled is not None:
            out["pooled.empty"] = pooled[0]
    return out


def build(tc, cfg, acc, dataset, bucket_of, vae, encoders, tokenizer, dtype) -> Cache:
    path = Path(tc.cache_dir) / f"cache-{fingerprint(tc, cfg, dataset.records, dataset.buckets, bucket_of)}.safetensors"
    with acc.main_process_first():  # the main process computes; the others wait at a barrier, then read
        if acc.is_main_process:
            if path.is_file():
                log.info("reusing cache %s", path)
            else:
                log.info("computing the latent%s cache for %d images -> %s",
                         "" if tc.train_text_encoder else " and text", len(dataset), path)
                write_safetensors(path, compute(dataset, bucket_of, vae, encoders, tokenizer, tc.batch_size,
                                                acc.device, dtype, text=not tc.train_text_encoder))
        tensors = load_file(path)
    return Cache(tensors)
