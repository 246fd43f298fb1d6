"""The latent-diffusion U-Net for SD 1.x, SD 2.x and SDXL (and their 9-channel inpainting twins).

Module paths equal the keys under ``model.diffusion_model.`` of the released single files, so those load
with ``load_state_dict(strict=True)`` after a prefix strip. Topology (ldm ``openaimodel.UNetModel``):

    input_blocks.0        conv_in                                          (B, C0, h, w)
    per level l, num_res_blocks times:  ResBlock [+ SpatialTransformer if transformer_depth[l] > 0]
                 then (except at the last level) one Downsample            h, w halve
    middle_block          ResBlock, SpatialTransformer(transformer_depth_middle), ResBlock
                          (depth 0: one ResBlock; cfg.middle_block False: no middle block)
    per level (reversed), num_res_blocks + 1 times: ResBlock on cat(h, skip) [+ SpatialTransformer of the
                 block's depth, cfg.output_depths()]; the last of each level (except level 0) ends with an Upsample
    out                   GroupNorm, SiLU, conv_out                        (B, out_channels, h, w)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from latentdiff.config import UNetConfig
from latentdiff.models.layers import Downsample, ResBlock, SpatialTransformer, Upsample, timestep_embedding


class TimestepBlock(nn.Sequential):
    """ldm's TimestepEmbedSequential: gives emb to ResBlocks and context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def sdxl_vector(pooled: torch.Tensor, size_cond: torch.Tensor, adm_in_channels: int) -> torch.Tensor:
    """SDXL's added conditioning y (B, adm_in_channels) for ``label_emb``.

    pooled: (B, P) pooled text embedding (bigG); size_cond: (B, n) numbers, see ``size_numbers``: SDXL base
    (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), the refiner (B, 5) = (orig_h, orig_w,
    crop_top, crop_left, aesthetic_score). Each number gets a (adm_in_channels - P) / n dim [cos, sin] Fourier
    embedding (sgm ConcatTimestepEmbedderND; diffusers' ``text_time`` addition embedding), concatenated after
    pooled.
    """
    b, p = pooled.shape
    if size_cond.ndim != 2 or size_cond.shape[0] != b:
        raise ValueError(f"size_cond must have shape ({b}, n), got {tuple(size_cond.shape)}")
    n = size_cond.shape[1]
    if (adm_in_channels - p) <= 0 or (adm_in_channels - p) % n:
        raise ValueError(f"adm_in_channels - pooled width ({adm_in_channels} - {p}) must be a positive multiple of "
                         f"{n}")
    feats = timestep_embedding(size_cond.flatten(), (adm_in_channels - p) // n)  # (B*n, D)
    return torch.cat([pooled, feats.reshape(b, -1).to(pooled.dtype)], dim=-1)  # (B, adm_in_channels)


def size_numbers(h: int, w: int, refiner: bool = False, aesthetic_score: float = 6.0) -> list[float]:
    """The numbers ``sdxl_vector`` embeds for plain generation at (h, w) pixels: original size = target size,
    crop (0, 0); the refiner has an aesthetic score instead of the target size (diffusers' defaults: 6.0 for the
    prompt, 2.5 for the negative prompt, `negative_aesthetic_score`)."""
    return [h, w, 0, 0, aesthetic_score] if refiner else [h, w, 0, 0, h, w]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The guidance-scale embedding of LCM-distilled U-Nets (Luo et al. 2023, sec. 4.2; VDM's
    get_timestep_embedding, diffusers' get_guidance_scale_embedding): w (B,) = guidance_scale - 1, scaled by
    1000, as [sin, cos] with frequencies 10000^(-i / (half - 1)); odd widths get a zero column. -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * freqs.to(w.device)[None]  # (B, half)
    return torch.nn.functional.pad(torch.cat([emb.sin(), emb.cos()], dim=1), (0, dim % 2))


def transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    heads, dim_head = cfg.heads_at(ch)
    return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer,
                              cfg.norm_groups)


def encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """ldm's input_blocks (the U-Net's, and a ControlNet's copy of them): the stem conv, per level num_res_blocks
    ResBlocks (each with a SpatialTransformer where the level has depth), a Downsample between levels; and the
    channels of every block's output (the skips output_blocks consume; a ControlNet's zero convs)."""
    mc, g, emb_dim = cfg.model_channels, cfg.norm_groups, cfg.model_channels * 4
    blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    chans = [mc]
    ch = mc
    for level, (mult, depth) in enumerate(zip(cfg.channel_mult, cfg.transformer_depth)):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, emb_dim, mc * mult, g)]
            ch = mc * mult
            if depth:
                layers.append(transformer(cfg, ch, depth))
            blocks.append(TimestepBlock(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepBlock(Downsample(ch)))
            chans.append(ch)
    return blocks, chans


def middle_block(cfg: UNetConfig, ch: int) -> TimestepBlock:
    """ResBlock, SpatialTransformer, ResBlock; depth 0: one ResBlock (ComfyUI's transformer_depth_middle -1,
    diffusers' UNetMidBlock2D with no layers)."""
    emb_dim, g, d = cfg.model_channels * 4, cfg.norm_groups, cfg.transformer_depth_middle
    mid = [transformer(cfg, ch, d), ResBlock(ch, emb_dim, ch, g)] if d else []
    return TimestepBlock(ResBlock(ch, emb_dim, ch, g), *mid)


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if len(cfg.transformer_depth) != len(cfg.channel_mult):
            raise ValueError(f"transformer_depth {cfg.transformer_depth} needs one entry per level of "
                             f"channel_mult {cfg.channel_mult}")
        out_depths = cfg.output_depths()
        if len(out_depths) != len(cfg.channel_mult) * (cfg.num_res_blocks + 1):
            raise ValueError(f"transformer_depth_output {cfg.transformer_depth_output} needs one entry per output "
                             f"block: {len(cfg.channel_mult)} levels x {cfg.num_res_blocks + 1}")
        self.cfg = cfg
        mc, g = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.time_cond_proj_dim:
            # LCM's guidance embedding, added to the sinusoidal t embedding before time_embed (diffusers'
            # TimestepEmbedding.cond_proj). Original-layout files keep diffusers' name for it:
            # model.diffusion_model.time_embedding.cond_proj.weight (stable-diffusion.cpp lists it so)
            self.time_embedding = nn.ModuleDict({"cond_proj": nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)})
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        self.input_blocks, skip_chans = encoder(cfg)  # skip_chans: consumed in reverse by output_blocks
        ch = skip_chans[-1]
        if cfg.middle_block:
            self.middle_block = middle_block(cfg, ch)

        self.output_blocks = nn.ModuleList()
        depths = iter(out_depths)
        for level in reversed(range(len(cfg.channel_mult))):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                depth = next(depths)
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult, g)]
                ch = mc * mult
                if depth:
                    layers.append(transformer(cfg, ch, depth))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(g, ch, eps=1e-5), nn.SiLU(inplace=True), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[2].weight)  # ldm: zero-initialised output conv
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, control: tuple[list, torch.Tensor | None] | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, h, w); timesteps (B,) float, may be fractional; context (B, L, context_dim);
        y (B, adm_in_channels) for SDXL (see ``sdxl_vector``). control: ControlNet residuals (one per skip,
        the middle block's), added to the skips and the middle-block output (cldm ControlledUnetModel,
        diffusers' down/mid_block_additional_residual). guidance (B,) = guidance_scale - 1 for U-Nets with
        time_cond_proj_dim (see ``guidance_embedding``). Returns (B, out_channels, h, w)."""
        factor = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"latent height and width must be multiples of {factor}, got {tuple(x.shape[-2:])}")
        if (y is not None) != bool(self.cfg.adm_in_channels):
            raise ValueError(f"y must be given exactly when adm_in_channels > 0 "
                             f"(adm_in_channels={self.cfg.adm_in_channels}, y given: {y is not None})")
        if (guidance is not None) != bool(self.cfg.time_cond_proj_dim):
            raise ValueError(f"guidance must be given exactly when time_cond_proj_dim > 0 (time_cond_proj_dim="
                             f"{self.cfg.time_cond_proj_dim}, guidance given: {guidance is not None})")
        t = timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps
        t_emb = timestep_embedding(t, self.cfg.model_channels).to(x.dtype)  # (B, C0)
        if guidance is not None:
            w = guidance_embedding(guidance.reshape(-1).expand(x.shape[0]), self.cfg.time_cond_proj_dim)
            t_emb = t_emb + self.time_embedding["cond_proj"](w.to(x.dtype))
        emb = self.time_embed(t_emb)  # (B, 4*C0)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        if self.cfg.middle_block:
            h = self.middle_block(h, emb, context)
        if control is not None:
            down, mid = control
            if len(down) != len(skips):
                raise ValueError(f"control has {len(down)} skip residuals, this U-Net has {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down)]
            h = h if mid is None else h + mid
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
