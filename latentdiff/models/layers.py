"""Building blocks of the latent-diffusion U-Net (Rombach et al. 2022, built on Dhariwal & Nichol 2021).

Attribute names and ``nn.Sequential`` indices copy the original CompVis / Stability modules
(``ldm.modules.diffusionmodules.openaimodel`` and ``ldm.modules.attention``), so ``state_dict()`` keys equal
the keys of the released checkpoints. Where the original has a ``Dropout(p=0)`` at an index, we keep an
``nn.Identity`` there so the following indices stay the same.

Norms follow the originals: GroupNorm eps 1e-5 in ResBlocks and the output head, eps 1e-6 in front of the
SpatialTransformer, LayerNorm eps 1e-5 in the transformer blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) float32, in [cos, sin] order.

    freq_i = max_period ** (-i / (dim / 2)), i = 0 .. dim/2 - 1 (ldm; diffusers with flip_sin_to_cos=True,
    freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --- attention in query chunks (memory) -------------------------------------------------------------------

# Largest attention matrix (B * heads * N_q * N_k scores) computed at once. PyTorch's flash / memory-efficient
# kernels never materialise it, but its math fallback (some GPU dtypes and head widths, MPS) does: a 1024 px
# VAE decode would need 16384^2 scores = 1 GiB in fp32 per image.
ATTENTION_BUDGET_BYTES = 1 << 30


# Score bytes per chunk of the bf16 CPU path below: small enough to stay in glibc's heap (below its 32 MB mmap
# threshold, so no fresh pages to fault in per chunk) and near the caches; 16 MB was fastest of 2 / 8 / 16 / 32
# (benchmarks/README.md "512 px and up").
CPU_BF16_CHUNK_BYTES = 16 << 20
# Query rows per chunk at least (where one head's rows fit the bytes above): with all heads of a large batch in
# one chunk the rows shrank to 14-56 and the GEMMs went skinny; by groups of heads instead, 512 rows were the
# fastest of 128-1024 (SD 1.5 level 1 at 768 px: 0.92-1.07 -> 0.64 s per attention call; benchmarks/README.md)
CPU_BF16_MIN_ROWS = 512


def _cpu_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bf16 attention on the CPU as two bf16 batched GEMMs around a softmax, over chunks of heads and query rows.

    PyTorch's CPU flash kernel runs bf16 no faster than fp32 on CPUs without AMX (it multiplies small blocks of
    heads 40 wide), while oneDNN's bf16 GEMMs run at the bf16 peak: this takes 0.3-0.7x the kernel's time for
    every U-Net and VAE shape. Scores and probabilities are rounded to bf16 (the kernel keeps fp32 scores), the
    scale is applied inside the GEMM (baddbmm's alpha) so q is not rounded again."""
    b, h, n, d = q.shape
    q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (B * H, N, d); a copy of the head views
    # softmax over keys ignores a per-row constant: q.(k_j - mean_j k) gives the same probabilities with smaller
    # scores, so their bf16 rounding (relative to their size) costs less
    kf = k.float()
    k = (kf - kf.mean(dim=1, keepdim=True)).to(k.dtype)
    kt = k.transpose(1, 2)  # (B * H, d, N_k)
    bh, nk, budget = b * h, k.shape[1], CPU_BF16_CHUNK_BYTES // 2  # scores per chunk
    # chunks of `heads` heads x `rows` query rows: every head at once where that leaves CPU_BF16_MIN_ROWS rows
    rows = min(n, max(CPU_BF16_MIN_ROWS, budget // (bh * nk)), max(1, budget // nk))
    heads = max(1, min(bh, budget // (rows * nk)))
    scores = q.new_empty(heads, rows, nk)  # reused by every chunk
    out = q.new_empty(bh, n, v.shape[-1])
    for j in range(0, bh, heads):
        for i in range(0, n, rows):
            qc = q[j:j + heads, i:i + rows]
            s = scores[:qc.shape[0], :qc.shape[1]]
            torch.baddbmm(s, qc, kt[j:j + heads], beta=0, alpha=d ** -0.5, out=s)
            torch.bmm(torch.softmax(s, dim=-1), v[j:j + heads], out=out[j:j + heads, i:i + rows])
    return out.view(b, h, n, -1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, self_attention: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, N_q, d), k and v (B, H, N_k, d), in chunks of queries when the
    full score matrix would exceed ATTENTION_BUDGET_BYTES. Rows are independent: chunks give the same result.

    bf16 self-attention on the CPU without autograd takes the GEMM path above. Not cross-attention: over 77 text
    keys it gains nothing (0.94x), and CLIP's first token is an outlier key whose bf16-rounded score moved a
    trained U-Net's output past the 5e-3 bound. fp32 (the exact path) is always SDPA."""
    if (self_attention and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return _cpu_bf16_attention(q, k, v)
    b, h, n, _ = q.shape
    rows = max(1, ATTENTION_BUDGET_BYTES // (b * h * k.shape[2] * q.element_size()))
    if rows >= n:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(rows, dim=2)], dim=2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, add the projected timestep embedding, GroupNorm-SiLU-Conv, plus a skip path."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        # SiLU in place on the GroupNorm's fresh output: no new activation-sized tensor (on the 2-core CPU, SiLU
        # of 16.8 M floats took 36 ms out of place, 14 ms in place; the difference is first-touch page faults).
        # Not in emb_layers: its input, the timestep embedding, is shared by every block.
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=1e-5), nn.SiLU(inplace=True),
            nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=1e-5), nn.SiLU(inplace=True), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # ldm zero-initialises the last conv so a fresh block starts as the identity
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h += self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # emb (B, E) -> (B, C_out, 1, 1); h is fresh
        out = self.out_layers(h)
        out += self.skip_connection(x)  # in place, as the SiLUs; the same sum (addition commutes)
        return out


class Attention(nn.Module):
    """Multi-head attention of queries from x over keys/values from context (= x for self-attention)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # index 1 was Dropout(0) in ldm

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v, self_attention=context is x)  # (B, heads, N, dim_head)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2x inner, half of it gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)  # views of one fresh (B, N, 2 inner) tensor
        if torch.is_grad_enabled():  # training: backward needs gate as it is
            return x * F.gelu(gate)
        # inference: GELU in place, one new activation-sized tensor instead of two (the U-Net's largest: 2 x 4096 x
        # 1280 at 512 px, batch 2); the same values, and the product stays a fresh contiguous tensor (the next
        # Linear's GEMM, so its bits, depend on its input's layout)
        return x * torch.ops.aten.gelu_(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # keys ff.net.0.proj / ff.net.2; index 1 was Dropout(0) in ldm
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text context, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on context (B, L, context_dim).

    SD1 projects in and out with 1x1 convs on the map; SD2 / SDXL (``linear``) with Linear layers on tokens.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 linear: bool, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        # ldm zero-initialises proj_out so a fresh transformer starts as the identity
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        y = self.norm(x)
        if self.linear:
            y = self.proj_in(rearrange(y, "b c h w -> b (h w) c"))  # (B, HW, inner)
        else:
            y = rearrange(self.proj_in(y), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:
            y = rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w)
        else:
            y = self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))
        return x + y


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
