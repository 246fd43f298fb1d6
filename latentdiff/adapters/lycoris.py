"""Weight deltas of the LyCORIS adapters: LoHa, LoKr, LoCon's Tucker core, full diffs, and DoRA's re-normalisation.

Formulas as KohakuBlueleaf/LyCORIS (HEAD f49d30d) defines them; each function names its source. Every function
takes and returns fp32 tensors and works on the meta device, so a loader can check every shape before it
touches a weight. ``scale`` (alpha / rank) and the user's multiplier are applied by the caller
(``latentdiff.adapters.lora.merged``), except in ``dora``, whose multiplier is not a plain factor.

Shapes: a weight W is (out, in) for a Linear, (out, in, kh, kw) for a Conv2d. Deltas come out either in W's shape
or flattened to (out, in*kh*kw); the caller reshapes (LyCORIS does the same with ``weight.view(shape)``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Rebuild a conv weight from a Tucker core (LyCORIS ``functional/general.py::rebuild_tucker``):
    core (r1, r2, kh, kw), a (r1, out), b (r2, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, a, b)


def loha(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor,
         t1: Tensor | None = None, t2: Tensor | None = None) -> Tensor:
    """LoHa, the Hadamard product of two low-rank matrices (Hyeon-Woo et al. 2022, FedPara; LyCORIS
    ``functional/loha.py::diff_weight``): dW = (w1_a @ w1_b) * (w2_a @ w2_b).

    Without Tucker: w*_a (out, r), w*_b (r, in*kh*kw) -> (out, in*kh*kw).
    With Tucker (convs with k > 1): w*_a (r, out), w*_b (r, in), t* (r, r, kh, kw); each factor is
    ``tucker(t, w_a, w_b)`` -> (out, in, kh, kw)."""
    if t1 is not None:
        return tucker(t1, w1_a, w1_b) * tucker(t2, w2_a, w2_b)
    return (w1_a @ w1_b.flatten(1)) * (w2_a @ w2_b.flatten(1))


def lokr(w1: Tensor, w2: Tensor) -> Tensor:
    """LoKr, a Kronecker product (Edalati et al. 2022, KronA; LyCORIS ``functional/lokr.py::make_kron``):
    dW = w1 kron w2, with out = l*k and in = m*n.

    w1 (l, m) (stored whole, or rebuilt by the caller as w1_a @ w1_b); w2 (k, n) for a Linear, (k, n, kh, kw) for a
    conv stored whole or rebuilt by ``tucker``, or (k, n*kh*kw) for a conv rebuilt as w2_a @ w2_b. A 4-D w2 gets w1
    unsqueezed to (l, m, 1, 1), so the kernel dims pass through. Output (l*k, m*n[, kh, kw]) or (l*k, m*n*kh*kw);
    both reshape to the conv weight alike (row-major: column j*n*kh*kw + q of the 2-D form is in-channel j*n + q //
    (kh*kw))."""
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def lokr_factor(full: Tensor | None, a: Tensor | None, b: Tensor | None, t: Tensor | None = None) -> Tensor:
    """One Kronecker factor as LyCORIS ``LokrModule.get_weight`` rebuilds it: stored whole (``lokr_w1`` /
    ``lokr_w2``), Tucker (``lokr_t2`` (r, r, kh, kw) with ``lokr_w2_a`` (r, k), ``lokr_w2_b`` (r, n)), or a low-rank
    product a (k, r) @ b (r, n[*kh*kw])."""
    if full is not None:
        return full
    if t is not None:
        return tucker(t, a, b)
    return a @ b


def dora(w: Tensor, delta: Tensor, magnitude: Tensor, multiplier: float) -> Tensor:
    """DoRA, weight-decomposed adaptation (Liu et al. 2024), merged as LyCORIS does
    (``modules/locon.py::apply_weight_decompose``; LoHa and LoKr share it):
        W' = (W + dW) * (m * (s / ||W + dW|| - 1) + 1)
    with s = ``dora_scale`` and the norm over everything but the output dim (s of shape (out, 1[, 1, 1]), LyCORIS'
    default ``wd_on_out``) or but the input dim (s of shape (1, in[, 1, 1])). dW is already scaled by alpha / r;
    the multiplier m only blends the magnitude, as in LyCORIS (m = 1: W' = s * (W + dW) / ||W + dW||).
    LyCORIS adds float32 eps to the norm; so do we. w and delta: (out, in[, kh, kw]); returns W', not W' - W."""
    v = w + delta
    out, inp = v.shape[0], v.shape[1]
    ones = [1] * (v.dim() - 1)
    if magnitude.numel() == out and magnitude.shape[0] == out:
        norm = v.reshape(out, -1).norm(dim=1).reshape(out, *ones)
        s = magnitude.reshape(out, *ones)
    elif magnitude.numel() == inp:
        norm = v.transpose(0, 1).reshape(inp, -1).norm(dim=1).reshape(inp, *ones).transpose(0, 1)
        s = magnitude.reshape(inp, *ones).transpose(0, 1)
    else:
        raise ValueError(f"dora_scale of shape {list(magnitude.shape)} fits neither the {out} outputs nor the "
                         f"{inp} inputs of a weight of shape {list(v.shape)}")
    scale = s / (norm + torch.finfo(torch.float32).eps)
    return v * (multiplier * (scale - 1) + 1)
