"""U-Net state dicts: original (ldm / sgm) keys <-> diffusers ``UNet2DConditionModel`` keys.

Pure renames, tensors untouched. The mapping is built from the config in two layers:

1. block prefixes, by index arithmetic. With R = num_res_blocks and level i (0 = highest resolution):
       input_blocks.{1 + i*(R+1) + j}.0           <-> down_blocks.{i}.resnets.{j}        j < R
       input_blocks.{1 + i*(R+1) + j}.1           <-> down_blocks.{i}.attentions.{j}     (levels with attention)
       input_blocks.{(i+1)*(R+1)}.0.op            <-> down_blocks.{i}.downsamplers.0.conv (all but the last level)
       output_blocks.{k*(R+1) + j}.0 / .1         <-> up_blocks.{k}.resnets / attentions.{j}   j <= R, k = L-1-i
       output_blocks.{k*(R+1) + R}.{1|2}.conv     <-> up_blocks.{k}.upsamplers.0.conv  (.2 after an attention)
   plus the fixed ones (conv_in, time / label embeddings, middle block, output head);
2. inside a block: ResBlock parts are renamed (``in_layers.0`` <-> ``norm1`` ...), SpatialTransformer
   parts have the same names on both sides.

Any key outside this mapping raises ValueError naming it.
"""
from __future__ import annotations

import re

from torch import Tensor

from latentdiff.config import UNetConfig

# ResBlock sub-module names: ours -> diffusers ResnetBlock2D
_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_RESNET_INV = {v: k for k, v in _RESNET.items()}
# SpatialTransformer / Transformer2DModel parameters: the same names in both layouts
_ATTENTION = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_[qkv]|attn[12]\.to_out\.0"
    r"|ff\.net\.0\.proj|ff\.net\.2))\.(weight|bias)"
)
_PARAM = re.compile(r"(weight|bias)")


def _block_prefixes(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our prefix, diffusers prefix, kind) for every block; kind is 'param', 'resnet' or 'attention'."""
    r, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    out = [
        ("time_embed.0.", "time_embedding.linear_1.", "param"),
        ("time_embed.2.", "time_embedding.linear_2.", "param"),
        ("input_blocks.0.0.", "conv_in.", "param"),
        ("out.0.", "conv_norm_out.", "param"),
        ("out.2.", "conv_out.", "param"),
    ]
    if cfg.middle_block and cfg.transformer_depth_middle:
        out += [("middle_block.0.", "mid_block.resnets.0.", "resnet"),
                ("middle_block.1.", "mid_block.attentions.0.", "attention"),
                ("middle_block.2.", "mid_block.resnets.1.", "resnet")]
    elif cfg.middle_block:  # one ResBlock: diffusers' UNetMidBlock2D as UNet2DConditionModel builds it
        out.append(("middle_block.0.", "mid_block.resnets.0.", "resnet"))
    if cfg.time_cond_proj_dim:  # the same name in both layouts (see models/unet.py)
        out.append(("time_embedding.cond_proj.", "time_embedding.cond_proj.", "param"))
    if cfg.adm_in_channels:
        out += [("label_emb.0.0.", "add_embedding.linear_1.", "param"),
                ("label_emb.0.2.", "add_embedding.linear_2.", "param")]
    for i, depth in enumerate(cfg.transformer_depth):
        for j in range(r):
            n = 1 + i * (r + 1) + j
            out.append((f"input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}.", "resnet"))
            if depth:
                out.append((f"input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}.", "attention"))
        if i != levels - 1:
            out.append((f"input_blocks.{(i + 1) * (r + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", "param"))
    out_depths = cfg.output_depths()
    for k in range(levels):
        for j in range(r + 1):
            n = k * (r + 1) + j
            out.append((f"output_blocks.{n}.0.", f"up_blocks.{k}.resnets.{j}.", "resnet"))
            if out_depths[n]:
                out.append((f"output_blocks.{n}.1.", f"up_blocks.{k}.attentions.{j}.", "attention"))
        if k != levels - 1:
            n = k * (r + 1) + r
            out.append((f"output_blocks.{n}.{2 if out_depths[n] else 1}.conv.", f"up_blocks.{k}.upsamplers.0.conv.",
                        "param"))
    return out


def _rename(key: str, table: dict[str, tuple[str, str]], resnet: dict[str, str], layout: str) -> str:
    # block prefixes end with "." and have at most 4 dots; try the longest candidate first
    parts = key.split(".")
    for n in range(min(len(parts) - 1, 5), 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix not in table:
            continue
        new_prefix, kind = table[prefix]
        rest = key[len(prefix):]
        if kind == "param" and _PARAM.fullmatch(rest):
            return new_prefix + rest
        if kind == "attention" and _ATTENTION.fullmatch(rest):
            return new_prefix + rest
        if kind == "resnet":
            module, _, leaf = rest.rpartition(".")
            if module in resnet and _PARAM.fullmatch(leaf):
                return new_prefix + resnet[module] + "." + leaf
        break
    raise ValueError(f"unknown U-Net key {key!r} for the {layout} layout of this config")


def to_diffusers(sd: dict[str, Tensor], cfg: UNetConfig, extra: list[tuple[str, str, str]] = ()) -> dict[str, Tensor]:
    """Our (original-layout) U-Net keys -> diffusers UNet2DConditionModel keys; tensors are shared. `extra`: more
    (our prefix, diffusers prefix, kind) rows (a ControlNet's own blocks)."""
    table = {ours: (theirs, kind) for ours, theirs, kind in _block_prefixes(cfg) + list(extra)}
    return {_rename(k, table, _RESNET, "original"): v for k, v in sd.items()}


def from_diffusers(sd: dict[str, Tensor], cfg: UNetConfig, extra: list[tuple[str, str, str]] = ()) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel keys -> our (original-layout) keys; tensors are shared."""
    table = {theirs: (ours, kind) for ours, theirs, kind in _block_prefixes(cfg) + list(extra)}
    return {_rename(k, table, _RESNET_INV, "diffusers"): v for k, v in sd.items()}


def diffusers_config(cfg: UNetConfig, pooled_dim: int = 0, numbers: int = 6) -> dict:
    """kwargs for diffusers' UNet2DConditionModel with the same topology as ``UNetModel(cfg)``.

    pooled_dim: width of SDXL's pooled text embedding (1280 for SDXL); needed when ``cfg.adm_in_channels``
    is set, because diffusers stores the Fourier width (adm_in_channels - pooled_dim) / numbers separately
    (numbers: the embedded size numbers, 6 for SDXL, 5 for its refiner; see models/unet.size_numbers).
    """
    depth, mid = cfg.transformer_depth, cfg.transformer_depth_middle
    cross_mid = cfg.middle_block and mid > 0
    # diffusers' mid block takes the depth of the last level: it must agree with ours or be unused there
    if cross_mid and depth[-1] and depth[-1] != mid:
        raise ValueError(f"diffusers cannot express transformer_depth[-1]={depth[-1]} != "
                         f"transformer_depth_middle={mid}")
    # entries of levels without attention are unused
    layers = [d or 1 for d in depth[:-1]] + [depth[-1] or (mid if cross_mid else 1)]
    r = cfg.num_res_blocks
    up = [cfg.output_depths()[k * (r + 1):(k + 1) * (r + 1)] for k in range(len(depth))]  # per up block
    if any(0 in u and any(u) for u in up):  # diffusers would build an empty transformer at the zero
        raise ValueError(f"diffusers cannot express an up level with and without attention: {cfg.output_depths()}")
    kwargs = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if u[0] else "UpBlock2D" for u in up],
        mid_block_type="UNetMidBlock2DCrossAttn" if cross_mid else "UNetMidBlock2D" if cfg.middle_block else None,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks,
        # diffusers' "attention_head_dim" is the number of heads per level (diffusers issue #2011)
        attention_head_dim=[cfg.heads_at(cfg.model_channels * m)[0] for m in cfg.channel_mult],
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=cfg.use_linear_in_transformer,
        transformer_layers_per_block=layers,
        norm_num_groups=cfg.norm_groups,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )
    if cfg.time_cond_proj_dim:
        kwargs["time_cond_proj_dim"] = cfg.time_cond_proj_dim
    if cfg.transformer_depth_output:
        kwargs["reverse_transformer_layers_per_block"] = [[d or 1 for d in u] for u in up]
    if cfg.adm_in_channels:
        fourier = cfg.adm_in_channels - pooled_dim
        if pooled_dim <= 0 or fourier <= 0 or fourier % numbers:
            raise ValueError(f"pooled_dim must be in (0, adm_in_channels={cfg.adm_in_channels}) with "
                             f"adm_in_channels - pooled_dim a multiple of {numbers} (SDXL: 1280), got {pooled_dim}")
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=fourier // numbers,
                      projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return kwargs
