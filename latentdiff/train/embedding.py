"""Textual inversion (Gal et al. 2022, arXiv:2208.01618): n new token vectors per text encoder, trained on the
frozen model's diffusion loss, saved as A1111 / kohya write them (``emb_params`` (n, W); SDXL ``clip_l`` (n, 768)
+ ``clip_g`` (n, 1280)), named after the token so A1111 (file stem) and latentdiff's embeddings folder find it.

The vectors go into prompts exactly as a loaded embedding does (prompt.py, A1111's rule: the token's positions in
the caption take the n vectors), so what trains is what generation later computes. Only those rows train: they
are their own parameters, the token embedding table stays frozen.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from latentdiff.adapters.embeddings import Embedding
from latentdiff.models.text import Tokenizer
from latentdiff.models.unet import sdxl_vector
from latentdiff.prompt import encode_prompts
from latentdiff.weights import write_safetensors

from .config import TrainConfig
from .objective import UNetTrainer
from .validate import sample_grid

log = logging.getLogger("latentdiff.train")


def initial_vectors(tokenizer, encoders, init: str, n: int) -> list[torch.Tensor]:
    """(n, W) per encoder: the token embeddings of the words `init`, cycled to n rows (kohya's init_word)."""
    ids = tokenizer.encode(init)
    if not ids:
        raise ValueError(f"network.init {init!r} has no tokens")
    rows = [ids[i % len(ids)] for i in range(n)]
    with torch.no_grad():
        return [enc.embed_tokens(torch.tensor([rows], device=next(enc.parameters()).device))[0].float().cpu()
                for enc in encoders]


class WithEmbedding(nn.Module):
    """The frozen U-Net and text encoders with the trained vectors, as one module for DDP; forward takes the
    captions and encodes them with the vectors at the token's positions (prompt.encode_prompts)."""

    def __init__(self, unet: nn.Module, encoders: nn.ModuleList, vectors: nn.ParameterList, token: str, tokenizer):
        super().__init__()
        self.unet, self.encoders, self.vectors = unet, encoders, vectors
        self.token, self.tokenizer = token, tokenizer

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: list[str], size: torch.Tensor | None):
        emb = Embedding(self.token, list(self.vectors), "training")
        # weighting "none": captions are trained as written (A1111's brackets are not emphasis in training data)
        enc = encode_prompts(self.tokenizer, list(self.encoders), captions, weighting="none",
                             embeddings={self.token: emb})
        if size is None:
            return self.unet(x, t, enc.context)
        return self.unet(x, t, enc.context, sdxl_vector(enc.pooled.float(), size, self.unet.cfg.adm_in_channels))


class EmbeddingTrainer(UNetTrainer):
    """Textual inversion on the frozen model: only the new vectors reach the optimizer and the checkpoints."""

    def __init__(self, tc: TrainConfig, cfg, parts: dict[str, nn.Module], acc, dataset, bucket_of):
        net = tc.network
        captions = [tc.instance_prompt] if tc.instance_prompt is not None else [r.caption for r in dataset.records]
        missing = [c for c in captions if net.token not in c]
        if len(missing) == len(captions):
            raise ValueError(f"network.token {net.token!r} is in no caption (e.g. {missing[0]!r}), so the embedding "
                             f"would never train; caption the images with it, or set instance_prompt: "
                             f"'a photo of {net.token}'")
        if missing:
            log.warning("%d of %d captions do not contain the token %r", len(missing), len(captions), net.token)
        self.vectors = nn.ParameterList(initial_vectors(Tokenizer(), parts["text_encoders"], net.init, net.vectors))
        self.vectors.to(acc.device, torch.float32)
        super().__init__(tc, cfg, parts, acc, dataset, bucket_of, trained={"embedding": self.vectors})
        self.model = WithEmbedding(self.unet, self.encoders, self.vectors, net.token, self.tokenizer)
        self.export_name = f"{net.token}.safetensors"  # A1111 types an embedding by its file stem
        log.info("embedding %r: %d vectors of width %s, from %r", net.token, net.vectors,
                 " + ".join(str(v.shape[1]) for v in self.vectors), net.init)

    def text_input(self, captions: list[str]) -> list[str]:
        return captions

    def preview(self, out: Path) -> None:
        emb = Embedding(self.tc.network.token, [v.detach().float() for v in self.vectors], "training")
        sample_grid(self.tc, self.cfg, self.parts, self.device, out, {emb.token: emb})
        self.train_mode()

    def state_dict(self) -> dict:
        return {"model": {"embedding": {k: v.detach().cpu() for k, v in self.vectors.state_dict().items()}}}

    def embedding(self) -> dict[str, torch.Tensor]:
        """The file's tensors: emb_params, or clip_l + clip_g for SDXL (our encoder order)."""
        v = [p.detach().to("cpu", torch.float32).contiguous() for p in self.vectors]
        return {"emb_params": v[0]} if len(v) == 1 else {"clip_l": v[0], "clip_g": v[1]}

    def export(self, path: Path, metadata: dict[str, str]) -> None:
        write_safetensors(path, self.embedding(), {**metadata, "token": self.tc.network.token})
