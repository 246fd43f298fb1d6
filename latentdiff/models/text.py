"""Tokenizer and text encoders: CLIP-L (transformers) and OpenCLIP H / bigG (open_clip blocks).

Module paths equal the released single-file keys after the prefix strip:
  CLIP-L    ``cond_stage_model.`` (SD1) / ``conditioner.embedders.0.`` (SDXL) -> ``transformer.text_model.*``
  OpenCLIP  ``cond_stage_model.`` (SD2) / ``conditioner.embedders.1.`` (SDXL) -> ``model.*``
so a released file loads with ``load_state_dict(strict=True)`` once ``position_ids`` (not a weight) is dropped.

Both encoders return ``(hidden, pooled)`` for ids of shape (B, 77), optionally with ``inputs_embeds`` (B, 77, W):
token embeddings used instead of looking ``ids`` up (textual inversion writes its vectors into
``embed_tokens(ids)`` at placeholder positions); ``ids`` still locate the end token for pooling.
  hidden  (B, 77, W): the hidden state ``layer_from_end`` layers from the end (1 = last block's output,
          2 = penultimate), through the final layer norm iff ``cfg.final_norm``;
  pooled  the final block's output through the final layer norm at the first end token (49407), times
          ``text_projection`` when the tower has one (SDXL's pooled vector comes from bigG).
"""
from __future__ import annotations

import contextlib
import math

import torch
import transformers
from torch import nn

from latentdiff.config import TextEncoderConfig
from latentdiff.models.bpe import BPE

SOT_ID = 49406  # <start_of_text>
EOT_ID = 49407  # <end_of_text>; CLIP-L also pads with it, OpenCLIP pads with 0


class Tokenizer:
    """CLIP BPE tokenizer (the vocabulary bundled with open_clip; see bpe.py) with open_clip's text cleaning
    (ftfy, html-unescape twice, whitespace collapse, lower case).

    Padding is a model setting, not a token string: ``pad_id`` 49407 for CLIP-L, 0 for OpenCLIP. A "!"
    typed in a prompt always stays its own token (transformers' SD2 tokenizers map it to 0).
    """

    def __init__(self):
        self._bpe = BPE()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``, without start / end tokens and without truncation."""
        return self._bpe.encode(text)

    def wrap(self, ids: list[int], pad_id: int = EOT_ID, context_length: int = 77) -> list[int]:
        """[start] + ids (truncated to context_length - 2) + [end] + pad_id up to context_length."""
        ids = [SOT_ID, *ids[: context_length - 2], EOT_ID]
        return ids + [pad_id] * (context_length - len(ids))

    def __call__(self, texts: list[str], pad_id: int = EOT_ID, context_length: int = 77) -> torch.LongTensor:
        """(B, context_length) ids; up to the end token identical to ``open_clip.tokenize``."""
        if isinstance(texts, str):
            texts = [texts]  # not a sequence of one-character prompts
        return torch.tensor([self.wrap(self.encode(t), pad_id, context_length) for t in texts], dtype=torch.long)


def _check_layer(cfg: TextEncoderConfig, layer_from_end: int) -> None:
    if not 1 <= layer_from_end <= cfg.layers:
        raise ValueError(f"layer_from_end (clip_skip) must be in [1, {cfg.layers}] for this text encoder, "
                         f"got {layer_from_end}")


def _eot_index(ids: torch.Tensor) -> torch.Tensor:
    # first end token; argmax returns the first maximum, so this also holds when padding repeats it
    return (ids == EOT_ID).int().argmax(dim=-1)  # (B,)


def _check_embeds(ids: torch.Tensor, inputs_embeds: torch.Tensor, width: int) -> None:
    if inputs_embeds.shape != (*ids.shape, width):
        raise ValueError(f"inputs_embeds must have shape {(*ids.shape, width)} (ids' shape + width), "
                         f"got {tuple(inputs_embeds.shape)}")


@contextlib.contextmanager
def _output_replaced(module: nn.Module, output: torch.Tensor | None):
    """While inside, ``module`` returns ``output`` (None: unchanged, no hook at all)."""
    if output is None:
        yield
        return
    handle = module.register_forward_hook(lambda mod, args, out: output)  # a hook's return replaces the output
    try:
        yield
    finally:
        handle.remove()


def clip_config_kwargs(cfg: TextEncoderConfig, layers: int | None = None) -> dict:
    """transformers CLIPTextConfig kwargs for ``cfg`` (``layers`` overrides the depth, see weights/diffusers/text.py)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=cfg.layers if layers is None else layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length, hidden_act=cfg.act, layer_norm_eps=1e-5,
        projection_dim=cfg.projection_dim or cfg.width,  # read only by CLIPTextModelWithProjection
        # eos 49407 (not the legacy 2) makes transformers pool at the first end token
        bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=cfg.pad_id,
    )


class CLIPTextEncoder(nn.Module):
    """OpenAI CLIP text tower (SD1, SDXL's first encoder) as a transformers CLIPTextModel built from the config.

    ``self.transformer.text_model`` is transformers 5.x's CLIPTextModel (flat keys ``embeddings.*``) or 4.x's
    CLIPTextTransformer (the ``text_model`` inside its CLIPTextModel): either way our keys read
    ``transformer.text_model.embeddings...`` like the released files. Pooled output: transformers' pooled output
    (final-norm hidden state at the first end token, no projection); SD does not use it.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.kind != "clip":
            raise ValueError(f"CLIPTextEncoder needs kind 'clip', got {cfg.kind!r}")
        self.cfg = cfg
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_config_kwargs(cfg)))
        self.transformer = nn.Module()
        self.transformer.text_model = getattr(model, "text_model", model)
        # position ids are rebuilt in forward: a non-persistent buffer would stay on the meta device (or hold
        # garbage after to_empty) when the module is built on meta and loaded with assign=True
        del self.transformer.text_model.embeddings.position_ids

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, 77, W) of ids (B, 77), before the position embedding is added."""
        return self.transformer.text_model.embeddings.token_embedding(ids)

    def forward(self, ids: torch.Tensor, layer_from_end: int | None = None,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.cfg.layer_from_end if layer_from_end is None else layer_from_end
        _check_layer(self.cfg, k)
        clip = self.transformer.text_model
        if inputs_embeds is not None:
            _check_embeds(ids, inputs_embeds, self.cfg.width)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]  # (1, 77)
        # transformers' CLIPTextModel (5.x; 4.x's CLIPTextTransformer alike) takes no inputs_embeds, so the ids go in
        # and the token lookup's output is swapped for inputs_embeds (what A1111's EmbeddingsWithFixes does)
        with _output_replaced(clip.embeddings.token_embedding, inputs_embeds):
            out = clip(input_ids=ids, position_ids=positions, output_hidden_states=True)
        hidden = out.hidden_states[-k]  # (B, 77, W); hidden_states[0] is the embedding output
        if self.cfg.final_norm:
            hidden = clip.final_layer_norm(hidden)
        return hidden, out.pooler_output  # (B, 77, W), (B, W)


class OpenCLIPTextTower(nn.Module):
    """The text half of open_clip's ``CLIP``: attribute names equal the released ``...model.*`` keys.

    Built from open_clip's ``Transformer`` (resblocks with fused ``attn.in_proj_weight``) rather than
    ``TextTransformer``, whose keys lack ``logit_scale`` and whose forward returns only the last layer.
    ``text_projection`` [W, P] (used as ``x @ text_projection``) and ``logit_scale`` exist iff projection_dim > 0.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        import open_clip  # here, not at the top: its import costs 2.6 s and only SD2 / SDXL use it

        acts = {"gelu": nn.GELU, "quick_gelu": open_clip.transformer.QuickGELU}
        if cfg.act not in acts:
            raise ValueError(f"text encoder act must be one of {sorted(acts)}, got {cfg.act!r}")
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = open_clip.transformer.Transformer(
            w, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio, act_layer=acts[cfg.act], batch_first=True)
        self.ln_final = nn.LayerNorm(w)
        if cfg.projection_dim:
            self.text_projection = nn.Parameter(torch.empty(w, cfg.projection_dim))
            self.logit_scale = nn.Parameter(torch.empty(()))  # contrastive temperature; kept for round trips
        self._init_weights(cfg)

    def _init_weights(self, cfg: TextEncoderConfig) -> None:
        # open_clip's init (only matters for models built for training; loading replaces every tensor)
        if self.positional_embedding.is_meta:
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = cfg.width**-0.5 * (2 * cfg.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=cfg.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * cfg.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if cfg.projection_dim:
            nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
            nn.init.constant_(self.logit_scale, math.log(1 / 0.07))


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP ViT-H (SD2) / ViT-bigG (SDXL's second encoder) text tower; ``self.model`` holds the weights."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.kind != "open_clip":
            raise ValueError(f"OpenCLIPTextEncoder needs kind 'open_clip', got {cfg.kind!r}")
        self.cfg = cfg
        self.model = OpenCLIPTextTower(cfg)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, 77, W) of ids (B, 77), before the positional embedding is added."""
        return self.model.token_embedding(ids)

    def forward(self, ids: torch.Tensor, layer_from_end: int | None = None,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.cfg.layer_from_end if layer_from_end is None else layer_from_end
        _check_layer(self.cfg, k)
        m = self.model
        if inputs_embeds is None:
            inputs_embeds = m.token_embedding(ids)
        else:
            _check_embeds(ids, inputs_embeds, self.cfg.width)
        x = inputs_embeds + m.positional_embedding[: ids.shape[1]]  # (B, 77, W)
        n = ids.shape[1]
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)  # (77, 77)
        blocks = m.transformer.resblocks
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=causal)
            if i == len(blocks) - k:
                hidden = x  # (B, 77, W)
        if self.cfg.final_norm:
            hidden = m.ln_final(hidden)
        pooled = m.ln_final(x)[torch.arange(x.shape[0], device=x.device), _eot_index(ids)]  # (B, W)
        if self.cfg.projection_dim:
            pooled = pooled @ m.text_projection  # (B, P)
        return hidden, pooled


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """CLIPTextEncoder or OpenCLIPTextEncoder for ``cfg.kind``; works under ``torch.device("meta")``."""
    if cfg.kind == "clip":
        return CLIPTextEncoder(cfg)
    if cfg.kind == "open_clip":
        return OpenCLIPTextEncoder(cfg)
    raise ValueError(f"text encoder kind must be 'clip' or 'open_clip', got {cfg.kind!r}")
