"""Cache of VAE posteriors and text embeddings: computed once, on the main process, then read by every rank
and reused by later runs with the same model, data and resolution (the file name is a hash of those).

Posteriors (mean, std) are cached rather than latents, so each step still draws a fresh latent sample. With
train_text_encoder (or a LoRA on the text encoders, or an embedding) the text embeddings change every step, so
only the posteriors are cached.
"""
from __future__ import annotations

import dataclasses
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


def weights_hash(modules) -> str:
    """sha256 of the modules' parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(tc, cfg, records: list[data.Record], buckets, bucket_of, vae, encoders) -> str:
    # The cached tensors depend on the weights that compute them, not on where those came from: posteriors on
    # the VAE only (a run that changes just the U-Net side -- init file, prediction type, schedule -- reuses the
    # file), cached text embeddings on the text encoders too. Hashing a 160 MB SD VAE takes well under a second.
    text = not tc.text_trains
    model = cfg.to_json() if text else json.dumps(dataclasses.asdict(cfg.vae), sort_keys=True)
    ident = {
        "model": model, "weights": weights_hash([vae, *encoders] if text else [vae]),
        "data": tc.data, "builtin": [tc.builtin_size, tc.seed] if tc.data.startswith("builtin:") else None,
        "mixed_precision": tc.mixed_precision, "text": text, "layout": 2,
        "records": [[r.source if isinstance(r.source, str) else i, r.caption, list(r.size), buckets[b]]
                    for i, (r, b) in enumerate(zip(records, bucket_of))],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class Cache:
    """The cache file's tensors: posteriors as one (N_b, C, h, w) tensor per bucket b (a few large tensors, not
    one small tensor per image: 120k small ones fragmented the heap of a 60k-image run to 15 GB); ``bucket`` and
    ``row`` (N,) locate image i; text as context (N, 77, D) [pooled (N, P)] plus the empty prompt's."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = tensors

    def posterior(self, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.tensor(indices)
        buckets = self.t["bucket"][i].unique().tolist()
        if len(buckets) != 1:  # every batch comes from one bucket (data.epoch_batches)
            raise ValueError(f"a batch spans cache buckets {buckets}")
        rows = self.t["row"][i]
        mean, std = self.t[f"mean.{buckets[0]}"][rows], self.t[f"std.{buckets[0]}"][rows]  # (B, C, h, w)
        return mean.to(device).float(), std.to(device).float()

    def text(self, indices: list[int], dropped: list[bool], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        drop = torch.tensor(dropped).view(-1, 1, 1)
        context = torch.where(drop, self.t["context.empty"], self.t["context"][indices]).to(device)  # (B, 77, D)
        pooled = None
        if "pooled" in self.t:
            pooled = torch.where(drop[:, 0], self.t["pooled.empty"], self.t["pooled"][indices]).to(device)
        return context, pooled


@torch.no_grad()
def compute(dataset: data.ImageDataset, bucket_of, vae, encoders, tokenizer, batch_size: int, device,
            dtype, text: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a cache file (see Cache) for every image of the dataset."""
    n = len(dataset)
    means, stds, rows = {}, {}, torch.zeros(n, dtype=torch.int64)  # bucket -> [(b, C, h, w), ...]
    filled = {}  # bucket -> rows written so far
    contexts, pooleds = [], []
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        items = [dataset[(i, 0, bucket_of[i])] for i in idx]
        # images of one bucket share a size and go through the VAE as one batch
        for b in sorted({bucket_of[i] for i in idx}):
            group = [(i, it) for i, it in zip(idx, items) if bucket_of[i] == b]
            post = vae.encode(torch.stack([it["pixels"] for _, it in group]).to(device, dtype))
            means.setdefault(b, []).append(post.mean.cpu())
            stds.setdefault(b, []).append(post.std.cpu())
            done = filled.get(b, 0)
            rows[[i for i, _ in group]] = torch.arange(done, done + len(group))
            filled[b] = done + len(group)
        if text:
            context, pooled = encode_ids(encoders, tokenize(tokenizer, encoders, [it["caption"] for it in items],
                                                            device))
            contexts.append(context.cpu())
            if pooled is not None:
                pooleds.append(pooled.cpu())
    out = {"bucket": torch.tensor(bucket_of, dtype=torch.int64), "row": rows}
    for b, m in means.items():
        out[f"mean.{b}"], out[f"std.{b}"] = torch.cat(m), torch.cat(stds[b])
    if text:
        out["context"] = torch.cat(contexts)
        context, pooled = encode_ids(encoders, tokenize(tokenizer, encoders, [""], device))
        out["context.empty"] = context[0].cpu()
        if pooleds:
            out["pooled"], out["pooled.empty"] = torch.cat(pooleds), pooled[0].cpu()
    return out


def build(tc, cfg, acc, dataset, bucket_of, vae, encoders, tokenizer, dtype) -> Cache:
    key = fingerprint(tc, cfg, dataset.records, dataset.buckets, bucket_of, vae, encoders)
    path = Path(tc.cache_dir) / f"cache-{key}.safetensors"
    with acc.main_process_first():  # the main process computes; the others wait at a barrier, then read
        if acc.is_main_process:
            if path.is_file():
                log.info("reusing cache %s", path)
            else:
                log.info("computing the latent%s cache for %d images -> %s",
                         "" if tc.text_trains else " and text", len(dataset), path)
                write_safetensors(path, compute(dataset, bucket_of, vae, encoders, tokenizer, tc.batch_size,
                                                acc.device, dtype, text=not tc.text_trains))
        tensors = load_file(path)
    return Cache(tensors)
