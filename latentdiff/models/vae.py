"""KL autoencoder (the "first stage" of latent diffusion; Rombach et al. 2022, arXiv:2112.10752).

Module paths equal the original CompVis ``first_stage_model.`` checkpoint keys with that prefix stripped, so a
released single file loads with ``load_state_dict(strict=True)``:

    encoder.conv_in, encoder.down.N.block.M.*, encoder.down.N.downsample.conv, encoder.mid.{block_1,attn_1,block_2},
    encoder.norm_out, encoder.conv_out, quant_conv, post_quant_conv, decoder.conv_in, decoder.mid.*,
    decoder.up.N.block.M.*, decoder.up.N.upsample.conv, decoder.norm_out, decoder.conv_out

``decoder.up.N`` is indexed by resolution level like ``encoder.down.N`` (N = 0 is the full-resolution level), so
the decoder runs it in reverse order. Latents here are unscaled: the pipeline multiplies by
``cfg.scaling_factor`` after ``encode`` and divides before ``decode``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentdiff.config import VAEConfig
from latentdiff.models.layers import Upsample, attention


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    # ldm's Normalize: GroupNorm with eps 1e-6 (not PyTorch's default 1e-5)
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widths differ) skip. No time embedding."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(cfg, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on fresh tensors (norm and conv outputs): no new activation-sized tensors (see layers.ResBlock)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        h += self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs as in the checkpoints."""

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.norm = _norm(cfg, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head of width C, scale 1/sqrt(C)
        q, k, v = (rearrange(f(n), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = attention(q, k, v, self_attention=True)  # in query chunks when the (HW)^2 scores would not fit
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding only right and bottom by one (the original asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Mid(nn.Module):
    """ResnetBlock -> attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, cfg: VAEConfig, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, ch, ch)
        self.attn_1 = AttnBlock(cfg, ch)
        self.block_2 = ResnetBlock(cfg, ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: ``block`` (ResnetBlocks), then ``downsample`` except at the last level.
    Encoder.forward runs its parts (see UpLevel)."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(cfg, in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks)]
        )
        self.downsample = Downsample(out_ch) if downsample else None


class UpLevel(nn.Module):
    """One decoder resolution level: ``block`` (one more ResnetBlock than the encoder), then ``upsample``
    except at level 0 (full resolution). Decoder.forward runs its parts: a `level(h)` call would keep the
    level's input alive in the caller until the level ends (128 MB of the 512-px decode's peak)."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(cfg, in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks + 1)]
        )
        self.upsample = Upsample(out_ch) if upsample else None


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2*z_channels, H/f, W/f): mean and log-variance stacked on channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, out_ch in enumerate(widths):
            self.down.append(DownLevel(cfg, ch, out_ch, downsample=i != len(widths) - 1))
            ch = out_ch
        self.mid = Mid(cfg, ch)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:  # ... -> (B, ch*ch_mult[-1], H/f, W/f)
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """(B, z_channels, H/f, W/f) -> (B, 3, H, W). ``up[i]`` works at the resolution of ``encoder.down[i]``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(cfg, ch)
        levels = []
        for i in reversed(range(len(widths))):  # built lowest resolution first, stored by level index
            levels.insert(0, UpLevel(cfg, ch, widths[i], upsample=i != 0))
            ch = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], H/f, W/f)
        for stage in self.stages():  # ... -> (B, ch, H, W)
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))

    def stages(self) -> list[nn.Module]:
        """The ResnetBlocks and upsamplers after the mid block, in the order they run (lowest resolution first)."""
        return [m for level in reversed(self.up) for m in (*level.block, level.upsample) if m is not None]


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        # moments: (B, 2*z_channels, h, w), mean first then log-variance, as in ldm
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # ldm's clamp keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # noise is drawn on the generator's device (CPU generator -> same numbers on any device), like diffusers
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w): shape (B,)."""
        return 0.5 * torch.sum(self.mean**2 + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, z_channels, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latents (B, z_channels, H/f, W/f) -> image (B, 3, H, W), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def tiled_decode(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` in overlapping tiles of `tile` x `tile` latents, for images too large to decode at once.

        Peak memory is that of one tile's decode. Where tiles overlap (`overlap` latents, at least) their
        images are blended with linear ramps, so no seam shows. Not bit-equal to `decode`: convolutions at a
        tile's edge see zero padding instead of the neighbour, and the mid-block attention sees one tile;
        the overlap hides both (see tests/test_speed.py for the measured difference)."""
        _, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z)
        if not 0 < overlap < tile:
            raise ValueError(f"overlap must be in (0, tile={tile}), got {overlap}")
        f = self.cfg.downsample
        out = torch.zeros(z.shape[0], self.cfg.out_channels, h * f, w * f, device=z.device)  # fp32 sums
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device)
        for y0 in _tile_starts(h, tile, overlap):
            for x0 in _tile_starts(w, tile, overlap):
                th, tw = min(tile, h), min(tile, w)
                img = self.decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()  # (B, 3, th*f, tw*f)
                ramp = (_ramp(th * f, overlap * f, y0 > 0, y0 + th < h, z.device)[:, None]
                        * _ramp(tw * f, overlap * f, x0 > 0, x0 + tw < w, z.device)[None, :])
                out[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += img * ramp
                weight[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += ramp
        return (out / weight).to(z.dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction (B, 3, H, W), posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


# --- tiled decode helpers ----------------------------------------------------------------------------------


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along an axis of n latents: a stride of tile - overlap, the last tile flush with the end."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def _ramp(n: int, width: int, up: bool, down: bool, device) -> torch.Tensor:
    """(n,) blend weights of one tile along an axis: 1 inside; where a neighbour overlaps by `width` pixels,
    ~0 over the outer quarter (pixels that saw the zero padding at the tile's edge) and a linear ramp over the
    middle half. Never exactly 0, so every pixel keeps some weight."""
    r = torch.ones(n, device=device)
    edge = ((torch.arange(width, device=device) + 0.5 - width / 4) / (width / 2)).clamp(1e-4, 1.0)
    if up:
        r[:width] = edge
    if down:
        r[n - width:] = torch.minimum(r[n - width:], edge.flip(0))
    return r
