"""Rename the KL autoencoder's state dict between our (original ldm) keys and diffusers' ``AutoencoderKL`` keys.

One table of (ours, diffusers) module paths, built from the config, drives both directions, so
``from_diffusers(to_diffusers(sd))`` is the identity; a key outside it raises ValueError naming it. The only tensor
changes are in the mid-block attention: ldm's q/k/v/proj_out are 1x1 convs ``[C, C, 1, 1]``, diffusers'
to_q/to_k/to_v/to_out.0 are Linear ``[C, C]`` (same numbers, trailing 1x1 dropped).

Level indices: ``encoder.down.i`` = ``encoder.down_blocks.i``, but ``decoder.up.i`` (indexed by resolution, 0 =
full size) = ``decoder.up_blocks.{n-1-i}`` (indexed in execution order, 0 = lowest resolution).
"""
from __future__ import annotations

import re

import torch

from latentdiff.config import VAEConfig

# (ours, diffusers) for every name piece that differs; parameter suffixes (.weight / .bias) are kept.
_MID_ATTN = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]
_MID_ATTN_CONV = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")  # our 1x1-conv weights


def _resnet(ours: str, theirs: str, in_ch: int, out_ch: int) -> list[tuple[str, str]]:
    pieces = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")]
    if in_ch != out_ch:
        pieces.append(("nin_shortcut", "conv_shortcut"))
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in pieces]


def _name_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    """Every (our module path, diffusers module path) of the model with this config, without .weight / .bias."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    n, top = len(widths), widths[-1]
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.norm_out", f"{part}.conv_norm_out"),
                  (f"{part}.conv_out", f"{part}.conv_out")]
        pairs += _resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", top, top)
        pairs += _resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", top, top)
        pairs += [(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in _MID_ATTN]
    ch = cfg.ch
    for i, out_ch in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            pairs += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                             ch if j == 0 else out_ch, out_ch)
        ch = out_ch
        if i != n - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    for i in reversed(range(n)):  # decoder order: lowest resolution first
        k = n - 1 - i  # diffusers' up_blocks are numbered in that execution order
        for j in range(cfg.num_res_blocks + 1):
            pairs += _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                             ch if j == 0 else widths[i], widths[i])
        ch = widths[i]
        if i != 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    return pairs


def _renamed(key: str, table: dict[str, str], direction: str) -> str:
    module, _, param = key.rpartition(".")
    if module not in table or param not in ("weight", "bias"):
        raise ValueError(f"{direction}: unknown VAE key {key!r}")
    return f"{table[module]}.{param}"


def to_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our / ldm ``first_stage_model.`` keys (prefix already stripped) -> diffusers ``AutoencoderKL`` keys."""
    table = dict(_name_pairs(cfg))
    out = {}
    for key, t in sd.items():
        # mid attention: [C, C, 1, 1] conv -> [C, C] linear
        out[_renamed(key, table, "to_diffusers")] = t[:, :, 0, 0] if _MID_ATTN_CONV.fullmatch(key) else t
    return out


def from_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> our / ldm keys (without the ``first_stage_model.`` prefix)."""
    table = {theirs: ours for ours, theirs in _name_pairs(cfg)}
    out = {}
    for key, t in sd.items():
        new = _renamed(key, table, "from_diffusers")
        # mid attention: [C, C] linear -> [C, C, 1, 1] conv
        out[new] = t[:, :, None, None] if _MID_ATTN_CONV.fullmatch(new) else t
    return out


def diffusers_config(cfg: VAEConfig, sample_size: int = 512) -> dict:
    """Constructor kwargs of ``diffusers.AutoencoderKL`` for this config.

    ``sample_size`` is the image size the released configs record (512 for SD 1.x / 2.x, 1024 for SDXL); diffusers
    uses it only to pick tile sizes.
    """
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=sample_size,
        scaling_factor=cfg.scaling_factor,
    )
