"""Text-encoder state dicts: ours (released single-file names) <-> diffusers' text_encoder / text_encoder_2 folders.

diffusers stores every text encoder as a transformers model:
  role "sd1"   CLIP-L              -> CLIPTextModel;  ours ``transformer.text_model.X`` <-> ``text_model.X``
  role "sdxl"  CLIP-L (kind clip)  -> CLIPTextModel, same renaming (text_encoder)
               bigG (kind open_clip) -> CLIPTextModelWithProjection with all blocks (text_encoder_2);
               ``text_projection.weight`` [P, W] = our ``text_projection`` [W, P] transposed
  role "sd2"   OpenCLIP-H          -> CLIPTextModel cut after the conditioning layer (23 of 24 blocks), so its
               ``last_hidden_state`` (through the final norm) is SD2's penultimate-layer context

We write ``text_model.*`` names (the released folders' names; transformers 4.x and 5.x both load them) and read
both those and transformers 5.x's flat ``embeddings.*`` names.

What a folder cannot hold (listed by ``absent_in_diffusers``) from_diffusers fills with zeros, so the full encoder
loads strictly and a round trip through a single file keeps every released key name:
  - ``logit_scale`` (open_clip towers with a projection): transformers has no place for CLIP's temperature;
    nothing in generation reads it.
  - role "sd2": the cut-off last block(s) and ``text_projection``. An all-zero pre-norm residual block is the
    identity, so the conditioning context is unchanged; only the pooled vector, which SD2 never uses, becomes 0.
The caller should report the filled names.
"""
from __future__ import annotations

import torch
from torch import Tensor

from latentdiff.config import TextEncoderConfig
from latentdiff.models.text import build_text_encoder, clip_config_kwargs

ROLES = ("sd1", "sd2", "sdxl")
# open_clip block part -> transformers CLIPEncoderLayer part (the fused in_proj is split separately)
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def _check(cfg: TextEncoderConfig, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    kind = {"sd1": "clip", "sd2": "open_clip"}.get(role, cfg.kind)
    if cfg.kind != kind:
        raise ValueError(f"role {role!r} needs a text encoder of kind {kind!r}, got {cfg.kind!r}")
    if role == "sd2" and not cfg.final_norm:
        raise ValueError("role 'sd2' stores the encoder cut after its conditioning layer and relies on the final "
                         "norm; this config has final_norm=False")


def _kept_blocks(cfg: TextEncoderConfig, role: str) -> int:
    return cfg.layers - cfg.layer_from_end + 1 if role == "sd2" else cfg.layers


def diffusers_config(cfg: TextEncoderConfig, role: str) -> dict:
    """transformers CLIPTextConfig kwargs of the diffusers folder, ``architectures`` naming the model class:
    CLIPTextModelWithProjection for an open_clip encoder in role "sdxl" (text_encoder_2), else CLIPTextModel."""
    _check(cfg, role)
    cls = "CLIPTextModelWithProjection" if role == "sdxl" and cfg.kind == "open_clip" else "CLIPTextModel"
    return clip_config_kwargs(cfg, layers=_kept_blocks(cfg, role)) | {"architectures": [cls]}


def absent_in_diffusers(cfg: TextEncoderConfig, role: str) -> list[str]:
    """Our keys a diffusers folder of this role does not store (from_diffusers fills them with zeros): the
    blocks SD2 cuts off, and the CLIP head parts transformers has no place for."""
    _check(cfg, role)
    if cfg.kind == "clip":
        return []
    head = ["model.logit_scale"] if cfg.projection_dim else []
    if role == "sdxl":
        return head
    blocks = tuple(f"model.transformer.resblocks.{i}." for i in range(_kept_blocks(cfg, role), cfg.layers))
    with torch.device("meta"):
        keys = build_text_encoder(cfg).state_dict()
    return [k for k in keys if k.startswith(blocks)] + (["model.text_projection"] if cfg.projection_dim else []) + head


def to_diffusers(sd: dict[str, Tensor], cfg: TextEncoderConfig, role: str) -> dict[str, Tensor]:
    """Our encoder's state dict -> diffusers text encoder state dict (``text_model.*`` names)."""
    _check(cfg, role)
    if cfg.kind == "clip":
        return {"text_model." + _strip(k, "transformer.text_model."): v for k, v in sd.items()}
    out, absent = {}, set(absent_in_diffusers(cfg, role))
    for key, v in sd.items():
        name = _strip(key, "model.")
        if key in absent:
            continue
        if name in _TOP:
            out["text_model." + _TOP[name]] = v
        elif name == "text_projection":
            out["text_projection.weight"] = v.T.contiguous()  # x @ P  ==  Linear with weight P.T
        else:
            block, part = _split_block(name)
            prefix = f"text_model.encoder.layers.{block}."
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                for proj, t in zip("qkv", v.chunk(3, dim=0)):  # fused [3W, ...] rows are q, k, v
                    out[f"{prefix}self_attn.{proj}_proj.{part.rsplit('_', 1)[1]}"] = t.clone()
            else:
                module, param = part.rsplit(".", 1)
                out[prefix + _BLOCK[module] + "." + param] = v
    return out


def from_diffusers(sd: dict[str, Tensor], cfg: TextEncoderConfig, role: str) -> dict[str, Tensor]:
    """diffusers text encoder state dict -> ours. ``position_ids`` is dropped (not a weight); the keys of
    ``absent_in_diffusers`` are filled with zeros (see the module docstring)."""
    _check(cfg, role)
    sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()
          if not k.endswith("position_ids")}
    if cfg.kind == "clip":
        return {"transformer." + k: v for k, v in sd.items()}
    top = {"text_model." + v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, qkv = {}, {}
    for key, v in sd.items():
        if key in top:
            out["model." + top[key]] = v
        elif key == "text_projection.weight":
            out["model.text_projection"] = v.T.contiguous()
        else:
            layer, part = _split_layer(key)
            module, param = part.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[len("self_attn.")]] = v  # "q" / "k" / "v"
            elif module in block:
                out[f"model.transformer.resblocks.{layer}.{block[module]}.{param}"] = v
            else:
                raise ValueError(f"unexpected diffusers text encoder key {key!r}")
    for (layer, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text encoder layer {layer}: {param} needs q, k and v; found {sorted(parts)}")
        out[f"model.transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    if absent := absent_in_diffusers(cfg, role):
        ref = next(iter(out.values()))
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in build_text_encoder(cfg).state_dict().items()}
        out |= {k: torch.zeros(shapes[k], dtype=ref.dtype, device=ref.device) for k in absent}
    return out


def _strip(key: str, prefix: str) -> str:
    if not key.startswith(prefix):
        raise ValueError(f"unexpected text encoder key {key!r} (expected the prefix {prefix!r})")
    return key[len(prefix):]


def _split(key: str, head: str, what: str, shown: str) -> tuple[int, str]:
    """'<head>3.ln_1.weight' -> (3, 'ln_1.weight'); the error names `what` kind of key and the key as `shown`."""
    if not key.startswith(head):
        raise ValueError(f"unexpected {what} {shown!r} (expected {head}N.*)")
    index, part = key[len(head):].split(".", 1)
    return int(index), part


def _split_block(name: str) -> tuple[int, str]:
    """open_clip: 'transformer.resblocks.3.ln_1.weight' -> (3, 'ln_1.weight')."""
    return _split(name, "transformer.resblocks.", "open_clip text key", f"model.{name}")


def _split_layer(key: str) -> tuple[int, str]:
    """diffusers: 'text_model.encoder.layers.3.mlp.fc1.weight' -> (3, 'mlp.fc1.weight')."""
    return _split(key, "text_model.encoder.layers.", "diffusers text encoder key", key)
