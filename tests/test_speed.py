"""The fast path keeps quality (issue #7): bf16 U-Net vs fp32, tiled VAE decode vs untiled, chunked attention
vs full, the default-dtype rule, and dtype=float32 as the exact path. Speed itself is measured in benchmarks/."""
from __future__ import annotations

import copy
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import latentdiff
from latentdiff import speed
from latentdiff.config import TINY_SD15
from latentdiff.models import layers
from latentdiff.models.unet import UNetModel
from latentdiff.models.vae import AutoencoderKL


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Weights ~ N(0, 1/fan_in), norms (1, 0): no zero-initialised output convs, activations of unit scale,
    like a trained model's, so a bf16 error shows at its real size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
    return module.eval()


def _unet_inputs(cfg, batch=2, size=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([999.0, 281.5])[:batch]
    context = torch.randn(batch, 77, cfg.context_dim, generator=g)
    return x, t, context


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = ((a - ref) ** 2).mean()
    return (10 * torch.log10((ref.max() - ref.min()) ** 2 / mse)).item()


# --- bf16 fast path vs fp32 -----------------------------------------------------------------------------------


def _bf16_vs_fp32_unet_error() -> float:
    torch.manual_seed(0)
    unet = _randomise(UNetModel(TINY_SD15.unet))
    x, t, context = _unet_inputs(TINY_SD15.unet)
    with torch.inference_mode():
        ref = unet(x, t, context)
        fast = copy.deepcopy(unet).to(torch.bfloat16)
        out = fast(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    assert ref.abs().mean() > 0.1  # a real signal, not the zero-initialised output conv
    return _rel_l2(out, ref)


def test_bf16_fast_path_unet_call_close_to_fp32():
    # measured 1.5e-2 here and 1.6e-2 on the full-size SD 1.5 U-Net with random weights (diffusers' bf16 U-Net:
    # the same 1.6e-2); rounding the weights alone to bf16 gives 0.7e-2, and autocast (fp32 norms and residual
    # adds, bf16 convs and matmuls) gives exactly the same 1.5e-2. > 1e-4: bf16 really ran.
    err = _bf16_vs_fp32_unet_error()
    assert 1e-4 < err <= 2e-2, err


@pytest.mark.parametrize("name", ["emoji", "shapes"])
def test_bf16_unet_call_on_trained_weights_meets_the_issue_target(name):
    """Issue #7: one bf16 U-Net call within 1e-2 relative L2 of fp32. Random weights overstate the error
    (1.5e-2 above: every layer's rounding is amplified at unit gain); the trained SD1-layout U-Nets we ship give
    2.7e-3 to 4.0e-3 (measured at t = 50 .. 999). Released SD 1.5 weights cannot be fetched here."""
    pipe = latentdiff.load(name, dtype=torch.float32)
    context = pipe.encode_prompt("a red apple" if name == "emoji" else "a large red circle at the top left").context
    fast = copy.deepcopy(pipe.unet).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    n = pipe.cfg.size // pipe.cfg.vae.downsample
    for t in (999.0, 500.0, 50.0):
        x = torch.randn(2, pipe.cfg.unet.in_channels, n, n, generator=g)  # x_t has unit variance
        ts = torch.tensor([t, t])
        with torch.inference_mode():
            ref = pipe.unet(x, ts, context.expand(2, -1, -1))
            out = fast(x.bfloat16(), ts, context.expand(2, -1, -1).bfloat16())
        assert 1e-4 < _rel_l2(out, ref) <= 1e-2, (t, _rel_l2(out, ref))


# --- prepacked conv weights: the CPU bf16 fast path ------------------------------------------------------------


def _mkldnn_weights(module: nn.Module) -> int:
    return sum(p.is_mkldnn for p in module.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_convs_compute_the_plain_result_and_keep_the_weights_exact(dtype):
    if not speed.cpu_packs(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} conv weights on this CPU (see test_no_packing_where_the_cpu_cannot)")
    torch.manual_seed(0)
    exact = _randomise(UNetModel(TINY_SD15.unet))
    unet = copy.deepcopy(exact).to(dtype)
    plain = copy.deepcopy(unet)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, context = _unet_inputs(TINY_SD15.unet)
    x, context = x.to(dtype), context.to(dtype)
    x2 = torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(3)).to(dtype)  # another size
    assert speed.pack_conv_weights(unet) and not speed.pack_conv_weights(unet)  # the second time: no-op
    assert _mkldnn_weights(unet) == 0  # packed on the first call, for its input size
    with torch.inference_mode():
        ref, out = plain(x, t, context), unet(x, t, context)
        out2 = unet(x2, t[:1], context[:1])
        fp32, fp32_2 = exact(x.float(), t, context.float()), exact(x2.float(), t[:1], context[:1].float())
    n_convs = sum(type(m) is nn.Conv2d for m in unet.modules())
    assert _mkldnn_weights(unet) == n_convs > 10
    if dtype == torch.bfloat16:
        # the same bf16 products summed in another order: as far from fp32 as the plain bf16 call (measured
        # 1.41e-2 / 1.38e-2 for the packed size / another one, plain 1.48e-2: random weights, see above; packed vs
        # plain 1.2e-2)
        assert _rel_l2(out, fp32) <= 2e-2 and _rel_l2(out2, fp32_2) <= 2e-2
    else:  # fp32 products in another order (SD 1.5 at 256 px: 4.2e-6)
        assert _rel_l2(out, fp32) <= 1e-5 and _rel_l2(out2, fp32_2) <= 1e-5
    assert 0 < _rel_l2(out, ref)  # another kernel really ran
    sd = unet.state_dict()  # plain tensors, bit for bit
    assert sd.keys() == weights.keys()
    assert all(not v.is_mkldnn and torch.equal(v, weights[k]) for k, v in sd.items())
    assert all(not v.is_mkldnn for v in unet.input_blocks.state_dict().values())  # a submodule's too
    speed.unpack_conv_weights(unet)
    assert _mkldnn_weights(unet) == 0
    with torch.inference_mode():
        assert torch.equal(unet(x, t, context), ref)


def test_no_packing_where_the_cpu_cannot(monkeypatch):
    """oneDNN packs bf16 weights only with AVX512BW/VL/DQ or AVX-NE-CONVERT (an AVX2 EPYC raises a RuntimeError):
    there, and for an explicit bf16 load, the pipeline runs plain bf16 instead of failing."""
    monkeypatch.setattr(speed, "cpu_packs", lambda dtype: False)
    unet = UNetModel(TINY_SD15.unet).eval()
    assert not speed.pack_conv_weights(unet) and not hasattr(unet, "_convs_packed")
    assert not any(hasattr(m, "_pack_hook") for m in unet.modules())
    pipe = latentdiff.from_config("tiny-sd15", dtype=torch.bfloat16)
    assert not pipe.exact
    img = pipe("a red apple", steps=2, height=64, width=64, seed=0, progress=False)[0]
    assert img.size == (64, 64) and _mkldnn_weights(pipe.unet) == _mkldnn_weights(pipe.vae) == 0


def test_cpu_packs_asks_onednn():
    assert speed.cpu_packs(torch.float32)  # oneDNN packs fp32 on every x86-64 CPU torch runs on
    if speed.cpu_has_native_bf16():  # AVX512_BF16 comes with AVX512BW/VL/DQ; AMX with AVX-NE-CONVERT or them
        assert speed.cpu_packs(torch.bfloat16)
    assert not speed.cpu_packs(torch.int64)


def test_fp32_default_packs_and_stays_within_rounding(tmp_path, monkeypatch):
    """On a CPU without native bf16 the default is fp32 with prepacked convs (an AVX2 EPYC, SD 1.5 at 256 px: one
    U-Net call 5.5 -> 3.1 s); dtype=torch.float32 stays the exact, unpacked path; to(dtype=float32) makes a pipeline
    exact."""
    monkeypatch.setattr(speed, "_cpu_flags", lambda: frozenset({"avx2"}))
    torch.manual_seed(0)
    src = latentdiff.from_config("tiny-sd15")
    _randomise(src.unet)
    src.save(tmp_path / "m.safetensors")
    fast = latentdiff.load(tmp_path / "m.safetensors")
    exact = latentdiff.load(tmp_path / "m.safetensors", dtype=torch.float32)
    assert fast.dtype == exact.dtype == torch.float32 and not fast.exact and exact.exact
    kw = dict(steps=3, height=64, width=64, seed=0, progress=False)
    a, b = fast("a red apple", output="latent", **kw), exact("a red apple", output="latent", **kw)
    assert _mkldnn_weights(fast.unet) > 0 and _mkldnn_weights(exact.unet) == 0
    assert 0 < _rel_l2(a, b) <= 1e-4, _rel_l2(a, b)
    fast.to(dtype=torch.float32)  # an explicit fp32: exact from now on
    assert fast.exact and _mkldnn_weights(fast.unet) == 0
    assert torch.equal(fast("a red apple", output="latent", **kw), b)


@pytest.mark.skipif(not speed.cpu_has_native_bf16(), reason="the default dtype here is fp32: nothing packs")
def test_default_pipeline_packs_and_keeps_image_quality(tmp_path):
    """Issue #7: fast-path images of the shipped emoji model vs the fp32 path, PSNR >= 30 dB for 8 fixed prompts.
    The default pipeline (bf16 on this CPU) runs with prepacked convs after its first image; save() and to()
    still work after it."""
    prompts = ["red apple", "grinning face", "red heart", "cat face", "thumbs up", "panda", "birthday cake",
               "christmas tree"]
    fast = latentdiff.load("emoji")
    exact = latentdiff.load("emoji", dtype=torch.float32)
    a = fast(prompts, seed=0, progress=False, output="latent")
    assert _mkldnn_weights(fast.unet) > 0 and _mkldnn_weights(exact.unet) == 0
    imgs = [torch.tensor(np.asarray(i), dtype=torch.float32) for i in fast.decode(a)]
    assert _mkldnn_weights(fast.vae) > 0
    refs = [torch.tensor(np.asarray(i), dtype=torch.float32) for i in exact(prompts, seed=0, progress=False)]
    for p, img, ref in zip(prompts, imgs, refs):
        psnr = (10 * torch.log10(255.0**2 / ((img - ref) ** 2).mean())).item()
        assert psnr >= 30.0, (p, psnr)  # measured 37.0-47.5 dB (unpacked bf16: 33.9-49.3 dB)
    fast.save(tmp_path / "e.safetensors")  # packed weights are saved as the plain ones
    again = latentdiff.load(tmp_path / "e.safetensors")
    saved = {name: getattr(again, name).state_dict() for name in ("unet", "vae")}
    for name in saved:
        assert all(torch.equal(v, saved[name][k]) for k, v in getattr(fast, name).state_dict().items())
    fast.to(dtype=torch.float32)  # unpacks first
    assert _mkldnn_weights(fast.unet) == _mkldnn_weights(fast.vae) == 0
    for name in saved:
        assert all(torch.equal(v, saved[name][k].float()) for k, v in getattr(fast, name).state_dict().items())


# --- tiled VAE decode -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(TINY_SD15.vae).eval()


def test_tiled_decode_matches_untiled(vae):
    z = torch.randn(1, 4, 32, 40, generator=torch.Generator().manual_seed(2))  # 3 x 3 tiles of 24 latents
    with torch.inference_mode():
        full = vae.decode(z)
        tiled = vae.tiled_decode(z, tile=24, overlap=8)
    assert tiled.shape == full.shape == (1, 3, 256, 320)
    # not bit-equal: each tile's GroupNorm statistics and mid-block attention see only that tile
    psnr = _psnr(tiled, full)
    assert psnr >= 35.0, psnr  # measured 39.5 dB
    # no seam: the error next to the tile borders is no larger than elsewhere
    err = (tiled - full).abs().mean(dim=(0, 1))  # (256, 320)
    borders = [8 * c for c in (16, 24)]  # latent 16..24 overlap between the first two column tiles
    near = err[:, borders[0]:borders[1]].mean()
    assert near <= 2 * err.mean(), (near.item(), err.mean().item())


def test_tiled_decode_of_one_tile_is_decode(vae):
    z = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(vae.tiled_decode(z, tile=16, overlap=4), vae.decode(z))


def test_tiled_decode_rejects_bad_overlap(vae):
    with pytest.raises(ValueError, match="overlap"):
        vae.tiled_decode(torch.zeros(1, 4, 32, 32), tile=16, overlap=16)


# --- chunked attention ----------------------------------------------------------------------------------------


def test_compiled_unet_gives_the_same_images():
    """Pipeline.compile(): the compiled U-Net gives the eager latents (fp32); its weights are frozen into the
    compiled code (changing a parameter afterwards changes eager results, not compiled ones: that is what tells
    freezing happened); `to()` drops it."""
    from conftest import tiny_pipe

    pipe = tiny_pipe("tiny-sd15")
    kw = dict(steps=3, height=64, width=64, seed=0, output="latent", progress=False)
    eager = pipe("a red apple", **kw)
    pipe.compile()
    compiled = pipe("a red apple", **kw)
    assert _rel_l2(compiled, eager) < 1e-4, _rel_l2(compiled, eager)
    with torch.no_grad():
        pipe.unet.out[2].weight.mul_(2)  # the last conv: the eager prediction changes
    assert _rel_l2(pipe("a red apple", **kw), compiled) < 1e-4  # frozen: the old weights
    pipe.to("cpu")
    assert pipe._compiled_unet is None
    assert _rel_l2(pipe("a red apple", **kw), eager) > 1e-2  # eager again: the new weights


def test_chunked_attention_equals_full(monkeypatch):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (100, 77, 77))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    # budget of 7 query rows: 100 = 14 chunks of 7 + one of 2
    monkeypatch.setattr(layers, "ATTENTION_BUDGET_BYTES", 2 * 3 * 77 * 4 * 7)
    chunked = layers.attention(q, k, v)
    assert (chunked - full).abs().max().item() <= 1e-6


def test_vae_decode_with_chunked_attention_equals_full(vae, monkeypatch):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        full = vae.decode(z)
        monkeypatch.setattr(layers, "ATTENTION_BUDGET_BYTES", 64 * 4 * 5)  # 5 of the 64 query rows at a time
        chunked = vae.decode(z)
    assert (chunked - full).abs().max().item() <= 1e-5


# --- default dtype --------------------------------------------------------------------------------------------


def test_native_bf16_flags():
    assert speed.cpu_has_native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert speed.cpu_has_native_bf16(frozenset({"amx_bf16", "amx_tile"}))
    assert not speed.cpu_has_native_bf16(frozenset({"avx2", "avx512f", "avx512bw"}))  # emulated bf16: slower
    assert not speed.cpu_has_native_bf16(frozenset())


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)])
def test_default_dtype_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr(speed, "_cpu_flags", lambda: frozenset(flags))
    assert speed.default_dtype("cpu") == expected
    assert speed.default_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_default_dtype_cuda(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert speed.default_dtype("cuda") == expected


def test_default_dtype_other_devices_is_fp32():
    assert speed.default_dtype("meta") == torch.float32


# --- the exact path -------------------------------------------------------------------------------------------


def test_load_float32_is_the_exact_path(tmp_path):
    torch.manual_seed(0)
    src = latentdiff.from_config("tiny-sd15")
    src.save(tmp_path / "m.safetensors")
    exact = latentdiff.load(tmp_path / "m.safetensors", dtype=torch.float32)
    assert exact.dtype == torch.float32
    for m in (exact.unet, exact.vae):
        for p in m.parameters():
            assert p.dtype == torch.float32 and p.is_contiguous()
    x, t, context = _unet_inputs(TINY_SD15.unet)
    with torch.inference_mode():
        assert torch.equal(exact.unet(x, t, context), src.unet(x, t, context))


def test_load_default_picks_the_fast_path(tmp_path):
    torch.manual_seed(0)
    latentdiff.from_config("tiny-sd15").save(tmp_path / "m.safetensors")
    pipe = latentdiff.load(tmp_path / "m.safetensors")
    assert pipe.dtype == speed.default_dtype("cpu")
    assert next(pipe.unet.parameters()).dtype == pipe.dtype


# --- memory: text encoders freed after encoding ---------------------------------------------------------------


def test_keep_text_encoders_false_frees_them_and_keeps_the_image(tmp_path):
    """pipe(..., keep_text_encoders=False) gives the same latents, then holds no text-encoder weights; the
    encoded prompt still works (prompt cache), a new prompt, save() and to() say why they cannot."""
    from conftest import tiny_pipe

    kw = dict(steps=2, height=64, width=64, seed=0, output="latent", progress=False)
    ref = tiny_pipe("tiny-sd15")("a red apple", **kw)
    pipe = tiny_pipe("tiny-sd15")
    assert not speed.text_encoders_released(pipe.text_encoders)
    out = pipe("a red apple", keep_text_encoders=False, **kw)
    assert torch.equal(out, ref)
    assert speed.text_encoders_released(pipe.text_encoders)
    assert all(p.is_meta for p in pipe.text_encoders.parameters())  # no storage left
    assert torch.equal(pipe("a red apple", **kw), ref)  # encoded before: from the cache
    with pytest.raises(RuntimeError, match="encoding the prompt 'a blue pear'.*keep_text_encoders=False"):
        pipe("a blue pear", **kw)
    with pytest.raises(RuntimeError, match=r"save\(\) needs the text encoders"):
        pipe.save(tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    device, dtype = pipe.device, pipe.dtype
    with pytest.raises(RuntimeError, match=r"to\(\) needs the text encoders"):
        pipe.to(dtype=torch.bfloat16)
    assert (pipe.device, pipe.dtype) == (device, dtype)  # changed nothing


# --- 512 px and up (issue #29) ---------------------------------------------------------------------------------


def test_bf16_self_attention_on_the_cpu_is_two_gemms_in_chunks(monkeypatch):
    """bf16 CPU self-attention without autograd is baddbmm -> softmax -> bmm over chunks of heads and query rows:
    the same bits for any chunking, within bf16 rounding of fp32; cross-attention and autograd get SDPA, fp32 (exact path) too."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (50, 40, 40))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = torch.nn.functional.scaled_dot_product_attention(qb.float(), kb.float(), vb.float())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        out = layers.attention(qb, kb, vb, self_attention=True)
        chunked = []
        # (bytes of scores, minimum rows) -> chunks of heads x rows: all 6 x 7 (7 x 7 + 1 rows); 2 x 16 (three
        # head groups, rows 16 x 3 + 2); 1 x 7 (one head's 64 rows would not fit the bytes)
        for nbytes, min_rows in ((6 * 7 * 40 * 2, 1), (2 * 16 * 40 * 2, 16), (7 * 40 * 2, 64)):
            monkeypatch.setattr(layers, "CPU_BF16_CHUNK_BYTES", nbytes)
            monkeypatch.setattr(layers, "CPU_BF16_MIN_ROWS", min_rows)
            chunked.append(layers.attention(qb, kb, vb, self_attention=True))
        assert torch.equal(layers.attention(qb, kb, vb), sdpa(qb, kb, vb))  # cross-attention
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 50, 16)
    assert all(torch.equal(c, out) for c in chunked)
    assert _rel_l2(out, exact) < 1e-2, _rel_l2(out, exact)
    assert not torch.equal(out, sdpa(qb, kb, vb))  # really the other path
    qg = qb.clone().requires_grad_()
    trained = layers.attention(qg, kb, vb, self_attention=True)
    assert torch.equal(trained, sdpa(qb, kb, vb))
    trained.sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    assert torch.equal(layers.attention(q, k, v, self_attention=True), sdpa(q, k, v))


def test_geglu_in_place_at_inference_gives_the_same_bits_and_trains():
    torch.manual_seed(0)
    m = layers.GEGLU(16, 32)
    x = torch.randn(2, 5, 16)
    h, gate = m.proj(x).chunk(2, dim=-1)
    ref = h * torch.nn.functional.gelu(gate)
    with torch.inference_mode():
        out = m(x)
    assert out.is_contiguous() and torch.equal(out, ref)
    m(x).square().sum().backward()  # the training path keeps what backward needs
    assert m.proj.weight.grad.abs().sum() > 0




_HEAP_SCRIPT = """
import ctypes, torch
import latentdiff
from latentdiff import speed

class MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
held = []

def fresh_mmap(n=64 << 20):  # does an n-byte tensor take a fresh mmap now?
    before = mallinfo2().hblkhd
    t = torch.empty(n, dtype=torch.uint8)
    return mallinfo2().hblkhd - before >= n

pipe = latentdiff.from_config("tiny-sd15")
# decoding first (sampling leaves a free 64 MB chunk in the heap, which glibc would carve smaller requests from):
# a 12 MB tensor (below glibc's threshold) mapped on its own, then from the heap again
torch.empty(16 << 20, dtype=torch.uint8)  # a freed 16 MB mapping raises glibc's dynamic threshold to 16 MB
decode, mapped = pipe.vae.decode, []
pipe.vae.decode = lambda z: mapped.append(fresh_mmap(12 << 20)) or decode(z)
print(fresh_mmap(8 << 20))  # freed, 8 MB stay free at the heap's top: 12 MB do not fit there
pipe.decode(torch.zeros(1, 4, 8, 8))
print(mapped, fresh_mmap(12 << 20))
before = fresh_mmap()
# the first step's callback decodes (the decode's own policy ends, the sampler's applies again)
pipe("x", steps=2, height=64, width=64, output="latent", progress=False,
     callback=lambda i, sigma, x: (pipe.decode(x) if i == 0 else None, held.append(fresh_mmap())))
# after: 1 GB, larger than any chunk the tiny model freed (a freed 64 MB chunk may be reused, mmap or not)
print(before, held, fresh_mmap(1 << 30))
"""


def test_decode_trims_the_heap_after_each_decoder_stage_and_removes_its_hooks(monkeypatch):
    for k in speed._MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    pipe = latentdiff.from_config("tiny-sd15")
    stages = pipe.vae.decoder.stages()
    assert len(stages) == 2 * 4 + 3  # 4 levels of num_res_blocks + 1 = 2 ResnetBlocks, 3 upsamplers
    trims = []
    monkeypatch.setattr(speed, "release_freed_memory", lambda: trims.append(1))
    pipe.decode(torch.zeros(1, 4, 8, 8))
    assert len(trims) == len(stages) + 1  # after each stage, and once at the end of the block
    assert not any(m._forward_hooks for m in stages)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_sampling_on_the_cpu_serves_large_tensors_from_the_heap_and_decoding_maps_them():
    """While the sampler runs, a 64 MB tensor is no fresh mmap; before and after it is. While the VAE decodes, an
    8 MB one is, after it not (a clean process each). Nothing changes where the user set glibc's malloc
    variables."""
    def run(**extra):
        env = {**{k: v for k, v in os.environ.items() if k not in speed._MALLOC_ENV}, **extra}
        out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run() == "False\n[True] False\nTrue [False, False] True"
    # the user's variable fixes glibc's mmap threshold at its 128 kB default: every tensor here is mapped, throughout
    assert run(MALLOC_TRIM_THRESHOLD_="1000000") == "True\n[True] True\nTrue [True, True] True"
