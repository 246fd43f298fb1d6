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

    def forward(self, x: torch.Tensor, strips: bool = False) -> torch.Tensor:
        if strips and x.nbytes > STRIPS_ABOVE_BYTES:
            h = norm_silu_conv_strips(self.norm1, self.conv1, x)
            skip = self.nin_shortcut if self.nin_shortcut is not None else (lambda t: t)
            return norm_silu_conv_strips(self.norm2, self.conv2, h, residual=lambda r0, r1: skip(x[:, :, r0:r1]))
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
    """One encoder resolution level: ``block`` (ResnetBlocks), then ``downsample`` except at the last level."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(cfg, in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks)]
        )
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


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

    def upsampled(self, x: torch.Tensor, strips: bool) -> torch.Tensor:
        if strips and 4 * x.nbytes > STRIPS_ABOVE_BYTES:
            return upsample_conv_strips(self.upsample.conv, x)
        return self.upsample(x)


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
        for level in self.down:
            h = level(h)  # ... -> (B, ch*ch_mult[-1], H/f, W/f)
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

    def forward(self, z: torch.Tensor, strips: bool = False) -> torch.Tensor:
        """strips: inference only, large levels row strip by row strip (see norm_silu_conv_strips)."""
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], H/f, W/f)
        for level in reversed(self.up):  # ... -> (B, ch, H, W)
            for block in level.block:
                h = block(h, strips)
            if level.upsample is not None:
                h = level.upsampled(h, strips)
        if strips and h.nbytes > STRIPS_ABOVE_BYTES:
            return norm_silu_conv_strips(self.norm_out, self.conv_out, h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


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

    def decode(self, z: torch.Tensor, strips: bool = False) -> torch.Tensor:
        """z: unscaled latents (B, z_channels, H/f, W/f) -> image (B, 3, H, W), roughly in [-1, 1].
        strips: the large levels row strip by row strip, without autograd (norm_silu_conv_strips): the same
        function up to rounding, a fraction of the memory."""
        return self.decoder(self.post_quant_conv(z), strips)

    def tiled_decode(self, z: torch.Tensor, tile: int = 64, overlap: int = 16, strips: bool = False) -> torch.Tensor:
        """`decode` in overlapping tiles of `tile` x `tile` latents, for images too large to decode at once.

        Peak memory is that of one tile's decode. Where tiles overlap (`overlap` latents, at least) their
        images are blended with linear ramps, so no seam shows. Not bit-equal to `decode`: convolutions at a
        tile's edge see zero padding instead of the neighbour, and the mid-block attention sees one tile;
        the overlap hides both (see tests/test_speed.py for the measured difference)."""
        _, _, h, w = z.shape
        if h <= tile and w <= tile:
            return self.decode(z, strips)
        if not 0 < overlap < tile:
            raise ValueError(f"overlap must be in (0, tile={tile}), got {overlap}")
        f = self.cfg.downsample
        out = torch.zeros(z.shape[0], self.cfg.out_channels, h * f, w * f, device=z.device)  # fp32 sums
        weight = torch.zeros(1, 1, h * f, w * f, device=z.device)
        for y0 in _tile_starts(h, tile, overlap):
            for x0 in _tile_starts(w, tile, overlap):
                th, tw = min(tile, h), min(tile, w)
                img = self.decode(z[:, :, y0:y0 + th, x0:x0 + tw], strips).float()  # (B, 3, th*f, tw*f)
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


# --- exact row strips (inference) ----------------------------------------------------------------------------
#
# At 512 px the decoder's last levels hold (1, 256 | 128, 512, 512) activations (67-134 MB in bf16), and every
# GroupNorm, SiLU and conv of them makes another full-size tensor, plus oneDNN's own copies: the decode's peak
# was 0.55 GB above the weights. GroupNorm -> SiLU -> conv3x3 needs the whole tensor only for the GroupNorm
# statistics; with those gathered first, each strip of output rows needs just its input rows plus one halo row
# each side. So the large levels run strip by strip into one output tensor: the same function (unlike
# tiled_decode), rounded in another order.

# Activations above this run in strips; below it a level's tensors are small next to the weights.
STRIPS_ABOVE_BYTES = 32 << 20
# fp32 bytes of one strip's normalised input: below glibc's 32 MB mmap threshold (no fresh pages per strip)
STRIP_BYTES = 16 << 20


def _strips(x: torch.Tensor, height: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) covering `height` output rows, an even number of rows each (upsampling keeps whole
    input rows), sized so one strip of x's channels in fp32 is about STRIP_BYTES."""
    b, c, _, w = x.shape
    rows = max(2, STRIP_BYTES // (4 * b * c * w) // 2 * 2)
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]


def _group_norm_affine(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm(x) = x * scale + shift, per sample and channel ((B, C, 1, 1) each, fp32), with the statistics
    of the whole x: PyTorch's own GroupNorm kernel gives each strip's mean and 1/std in fp32 (fp32 affine
    parameters make it accumulate a low-precision x in fp32), combined pairwise (Chan et al. 1979)."""
    b, c, _, w = x.shape
    g = norm.num_groups
    ones, zeros = torch.ones(c, device=x.device), torch.zeros(c, device=x.device)
    n = mean = m2 = None
    for r0, r1 in _strips(x, x.shape[2]):
        _, mean_s, rstd_s = torch.ops.aten.native_group_norm(x[:, :, r0:r1], ones, zeros, b, c, (r1 - r0) * w, g,
                                                             norm.eps)  # (B, G) each
        n_s = c // g * (r1 - r0) * w
        m2_s = (rstd_s.double().pow(-2) - norm.eps) * n_s  # the kernel's 1/sqrt(var + eps), undone
        if n is None:
            n, mean, m2 = n_s, mean_s.double(), m2_s
            continue
        delta, total = mean_s.double() - mean, n + n_s
        mean = mean + delta * (n_s / total)
        m2 = m2 + m2_s + delta.square() * (n * n_s / total)
        n = total
    rstd = torch.rsqrt(m2 / n + norm.eps).float()[..., None]  # (B, G, 1)
    scale = norm.weight.float().view(g, c // g) * rstd  # (B, G, C/G)
    shift = norm.bias.float().view(g, c // g) - mean.float()[..., None] * scale
    return scale.reshape(b, c, 1, 1), shift.reshape(b, c, 1, 1)


def _into(out: torch.Tensor | None, y: torch.Tensor, shape: tuple, r0: int, r1: int) -> torch.Tensor:
    """Write strip y into rows [r0, r1) of out, made at the first strip in y's memory format (a packed conv
    returns channels-last)."""
    if out is None:
        cl = y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        out = torch.empty(shape, dtype=y.dtype, device=y.device,
                          memory_format=torch.channels_last if cl else torch.contiguous_format)
    out[:, :, r0:r1] = y
    return out


def norm_silu_conv_strips(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor, residual=None) -> torch.Tensor:
    """conv(silu(norm(x))) [+ residual(r0, r1) for rows r0:r1] for a 3x3, padding-1 conv, row strip by row
    strip. A strip's conv sees one halo row each side (zero padding only at the image's own edges); the two
    rows it computes against its zero padding are dropped."""
    scale, shift = _group_norm_affine(norm, x)
    h = x.shape[2]
    out = None
    for r0, r1 in _strips(x, h):
        lo, hi = max(0, r0 - 1), min(h, r1 + 1)
        t = x[:, :, lo:hi].to(torch.float32, copy=True).mul_(scale).add_(shift)  # never x itself, when fp32
        y = conv(F.silu(t, inplace=True).to(x.dtype))[:, :, r0 - lo:r1 - lo]
        if residual is not None:
            y = y + residual(r0, r1)
        out = _into(out, y, (x.shape[0], conv.out_channels, h, x.shape[3]), r0, r1)
    return out


def upsample_conv_strips(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest 2x upsample of x) (layers.Upsample) by strips of output rows: output rows [r0, r1) (r0, r1
    even) read upsampled rows r0 - 1 .. r1, i.e. input rows r0/2 - 1 .. r1/2; the strip upsamples those (at
    the image's edges only what exists) and drops the rows its conv computed against zero padding."""
    h, w = x.shape[2], x.shape[3]
    out = None
    for r0, r1 in _strips(x, 2 * h):
        lo, hi = max(0, r0 // 2 - 1), min(h, r1 // 2 + 1)
        up = F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest")
        y = conv(up)[:, :, r0 - 2 * lo:r1 - 2 * lo]
        out = _into(out, y, (x.shape[0], conv.out_channels, 2 * h, 2 * w), r0, r1)
    return out
