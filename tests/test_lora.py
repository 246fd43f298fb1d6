"""LoRA / LyCORIS files merged into the weights: parity with diffusers' loader where it is right, with the formulas
merged by hand into diffusers' modules where it is not (per-module alphas, LoHa, LoKr, DoRA), exact undo, errors."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import lora_files as lf
from conftest import rel_err, tiny_pipe
from latentdiff import speed
from latentdiff.adapters.lora import LoraStack, lora_info, read_lora

PROMPT, NEG, STEPS = "a photo of an astronaut riding a horse", "blurry, low quality", 4


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """oracle(preset) -> a fresh diffusers pipeline with tiny_pipe(preset)'s weights (the folder is written once)."""
    import diffusers

    folders = {}

    def make(preset):
        if preset not in folders:
            folders[preset] = tmp_path_factory.mktemp(preset) / "d"
            tiny_pipe(preset).save(folders[preset], format="diffusers")
        d = diffusers.DiffusionPipeline.from_pretrained(folders[preset], local_files_only=True,
                                                        torch_dtype=torch.float32)
        d.scheduler = diffusers.EulerDiscreteScheduler.from_config(d.scheduler.config)
        d.set_progress_bar_config(disable=True)
        return d
    return make


def ours(pipe):
    return pipe(PROMPT, negative_prompt=NEG, guidance_scale=7.5, steps=STEPS, seed=0, sampler="euler", height=64,
                width=64, output="latent", progress=False)


def theirs(d):
    return d(PROMPT, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images


def apply(pipe, path, **kw) -> LoraStack:
    stack = LoraStack(pipe.unet, pipe.text_encoders)
    stack.add(path, **kw)
    pipe._prompt_cache.clear()  # the text encoders changed
    return stack


def save(sd, path, metadata=None):
    safetensors.torch.save_file(sd, str(path), metadata=metadata)
    return path


def sd15_kohya(d, seed=0, **kw) -> dict:
    g = torch.Generator().manual_seed(seed)
    return (lf.kohya(lf.unet_locon_modules(d.unet), "lora_unet_", g, **kw)
            | lf.kohya(lf.te_modules(d.text_encoder), "lora_te_", g, **kw))


# --- parity with diffusers' load_lora_weights (one rank and alpha: where diffusers is right, wave2 1.6) --------


def test_kohya_sd15_locon_and_text_encoder_match_diffusers(oracle, tmp_path):
    d = oracle("tiny-sd15")
    path = save(sd15_kohya(d), tmp_path / "k.safetensors")  # 3x3 LoCon, 1x1 proj_in / shortcut, TE q..fc2
    pipe = tiny_pipe("tiny-sd15")
    base = ours(pipe)
    apply(pipe, path, unet_weight=0.7, te_weight=0.5)
    d.load_lora_weights(str(path), adapter_name="a")
    d.set_adapters(["a"], adapter_weights={"unet": 0.7, "text_encoder": 0.5})
    got, want = ours(pipe), theirs(d)
    assert rel_err(base, want) > 5e-2  # the LoRA matters
    assert rel_err(got, want) < 1e-3, rel_err(got, want)


def test_peft_sd15_with_metadata_alpha_matches_diffusers(oracle, tmp_path):
    d = oracle("tiny-sd15")
    g = torch.Generator().manual_seed(1)
    sd = {}
    for prefix, mods in (("unet.", lf.linear_and_convs(d.unet, lambda n: ".transformer_blocks." in n)),
                         ("text_encoder.", lf.te_modules(d.text_encoder))):
        for name, w in mods.items():
            sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = lf.lora_factors(w, 4, g)
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0",
            "ff.net.0.proj", "ff.net.2"], "text_encoder.r": 4, "text_encoder.lora_alpha": 2,
            "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    path = save(sd, tmp_path / "pytorch_lora_weights.safetensors",
                {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    f = read_lora(path)
    assert f.format == "diffusers" and {e.scale for e in f.entries.values()} == {2.0, 0.5}
    pipe = tiny_pipe("tiny-sd15")
    apply(pipe, f, unet_weight=0.8)
    d.load_lora_weights(str(path), adapter_name="a")
    d.set_adapters(["a"], adapter_weights=[0.8])
    assert rel_err(ours(pipe), theirs(d)) < 1e-3


def test_kohya_sdxl_unet_te1_te2_match_diffusers(oracle, tmp_path):
    d = oracle("tiny-sdxl")
    pipe = tiny_pipe("tiny-sdxl")
    g = torch.Generator().manual_seed(2)
    # SDXL kohya names are the original layout's: our own module paths (resnets, op, upsampler conv included)
    unet = lf.linear_and_convs(pipe.unet, lambda n: n.startswith(("input_blocks.", "middle_block.", "output_blocks."))
                               and n != "input_blocks.0.0")
    sd = (lf.kohya(unet, "lora_unet_", g) | lf.kohya(lf.te_modules(d.text_encoder), "lora_te1_", g)
          | lf.kohya(lf.te_modules(d.text_encoder_2), "lora_te2_", g))
    path = save(sd, tmp_path / "xl.safetensors")
    assert read_lora(path).target == "SDXL"
    apply(pipe, path, unet_weight=0.8, te_weight=0.6)
    d.load_lora_weights(str(path), adapter_name="a")
    d.set_adapters(["a"], adapter_weights={"unet": 0.8, "text_encoder": 0.6, "text_encoder_2": 0.6})
    assert rel_err(ours(pipe), theirs(d)) < 1e-3


# --- the formulas merged by hand into diffusers' modules -----------------------------------------------------


def test_per_module_ranks_and_alphas_equal_the_formula(oracle, tmp_path):
    """kohya semantics per module: alpha / r, and scale 1 without alpha (or alpha 0); diffusers gives attention
    modules the most common alpha instead (wave2-formats 1.6), so the oracle is the formula on its modules."""
    d = oracle("tiny-sd15")
    unet, te = lf.unet_locon_modules(d.unet), lf.te_modules(d.text_encoder)
    ranks = lambda n: 1 + len(n) % 5  # noqa: E731  (1..5, varying over modules)
    alphas = lambda n: None if "to_v" in n or "fc1" in n else 0.0 if "conv2" in n else 0.5 + len(n) % 3  # noqa: E731
    g = torch.Generator().manual_seed(3)
    sd = lf.kohya(unet, "lora_unet_", g, ranks, alphas) | lf.kohya(te, "lora_te_", g, ranks, alphas)
    path = save(sd, tmp_path / "mixed.safetensors")
    pipe = tiny_pipe("tiny-sd15")
    apply(pipe, path, unet_weight=0.9, te_weight=1.3)
    lf.add_deltas(d.unet, lf.kohya_deltas(sd, unet, "lora_unet_", 0.9))
    te_deltas = lf.kohya_deltas(sd, te, "lora_te_", 1.3)
    lf.add_deltas(d.text_encoder, {n if hasattr(d.text_encoder, "text_model") else n[len("text_model."):]: v
                                   for n, v in te_deltas.items()})
    assert rel_err(ours(pipe), theirs(d)) < 1e-3


def _loha(w, r, g, tucker=False):
    out, inp, *k = w.shape
    if tucker:  # LyCORIS Tucker shapes: w_a (r, out), w_b (r, in), t (r, r, kh, kw)
        t = {f"hada_w{i}_a": torch.randn(r, out, generator=g) * 0.3 for i in (1, 2)}
        t |= {f"hada_w{i}_b": torch.randn(r, inp, generator=g) * 0.3 for i in (1, 2)}
        t |= {f"hada_t{i}": torch.randn(r, r, *k, generator=g) * 0.3 for i in (1, 2)}
        factor = lambda i: torch.einsum("ijkl,ip,jr->prkl", t[f"hada_t{i}"], t[f"hada_w{i}_a"],  # noqa: E731
                                        t[f"hada_w{i}_b"])
        return t, factor(1) * factor(2)
    cols = w[0].numel()  # in * kh * kw
    t = {f"hada_w{i}_a": torch.randn(out, r, generator=g) * 0.3 for i in (1, 2)}
    t |= {f"hada_w{i}_b": torch.randn(r, cols, generator=g) * 0.3 for i in (1, 2)}
    return t, ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(w.shape)


def _lokr(w, variant, g):
    """(tensors, dW unscaled, rank or None): LoKr with out = 4 * (out / 4), in = 4 * (in / 4)."""
    out, inp, *k = w.shape
    l, m, kk, n = 4, 4, out // 4, inp // 4
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    t, rank = {}, None
    if variant == "ab_ab":
        t["lokr_w1_a"], t["lokr_w1_b"] = r(l, 2), r(2, m)
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    else:
        t["lokr_w1"] = w1 = r(l, m)
    if variant == "full":
        t["lokr_w2"] = w2 = r(kk, n, *k)
    elif variant == "tucker":  # lokr_t2 (r, r, kh, kw), w2_a (r, k), w2_b (r, n)
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"], rank = r(2, 2, *k), r(2, kk), r(2, n), 2
        w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:  # a conv's w2_b is (r, n * kh * kw)
        t["lokr_w2_a"], t["lokr_w2_b"], rank = r(kk, 3), r(3, n * max(1, w[0, 0].numel())), 3
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if variant == "ab_ab":
        rank = 3
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return t, torch.kron(w1, w2.contiguous()).reshape(w.shape), rank


def test_loha_lokr_full_and_dora_equal_the_formulas(oracle, tmp_path):
    d = oracle("tiny-sd15")
    g = torch.Generator().manual_seed(4)
    mods = lf.unet_locon_modules(d.unet)
    blk = "down_blocks.0.attentions.0.transformer_blocks.0."
    plan = {blk + "attn1.to_q": "loha", blk + "attn2.to_v": "loha", "down_blocks.0.resnets.0.conv1": "loha_tucker",
            blk + "attn1.to_k": "lokr_full", blk + "ff.net.2": "lokr_ab", "up_blocks.1.resnets.0.conv2": "lokr_ab",
            "up_blocks.0.resnets.1.conv1": "lokr_tucker", blk + "attn2.to_q": "lokr_ab_ab",
            "down_blocks.0.attentions.0.proj_out": "full", blk + "attn1.to_v": "loha_dora",
            "up_blocks.1.attentions.0.proj_in": "lora_dora"}
    sd, deltas, biases = {}, {}, {}
    m = 0.8
    for name, kind in plan.items():
        w = mods[name].detach()
        stem = "lora_unet_" + name.replace(".", "_")
        alpha = 2.0
        if kind.startswith("loha"):
            t, dw = _loha(w, 4, g, tucker=kind == "loha_tucker")
            scale = alpha / 4
        elif kind.startswith("lokr"):
            t, dw, rank = _lokr(w, kind[5:], g)
            scale = alpha / rank if rank else 1.0  # two whole factors: scale 1 whatever alpha says
        elif kind == "full":
            t = {"diff": torch.randn(w.shape, generator=g) * 0.02, "diff_b": torch.randn(w.shape[0], generator=g)}
            dw, scale = t["diff"], 1.0
            biases[name] = m * t["diff_b"]
        else:  # lora_dora
            down, up = lf.lora_factors(w, 4, g)
            t, dw, scale = {"lora_down.weight": down, "lora_up.weight": up}, lf.lora_delta(down, up, w.shape), 0.5
        sd |= {f"{stem}.{k}": v for k, v in t.items()} | {f"{stem}.alpha": torch.tensor(alpha)}
        if kind.endswith("dora"):  # LyCORIS: W' = (W + dW) * (m * (s / ||W + dW||_row - 1) + 1)
            s = w.flatten(1).norm(dim=1) * (1 + 0.2 * torch.rand(w.shape[0], generator=g))
            sd[f"{stem}.dora_scale"] = s.reshape(-1, *[1] * (w.dim() - 1))
            v = w + scale * dw
            norm = v.flatten(1).norm(dim=1).reshape(s.shape[0], *[1] * (w.dim() - 1)) + torch.finfo(torch.float32).eps
            deltas[name] = v * (m * (sd[f"{stem}.dora_scale"] / norm - 1) + 1) - w
        else:
            deltas[name] = m * scale * dw
    path = save(sd, tmp_path / "lycoris.safetensors")
    assert lora_info(path)["kinds"] == ["full", "loha", "loha+dora", "lokr", "lora+dora"]
    pipe = tiny_pipe("tiny-sd15")
    base = ours(pipe)
    apply(pipe, path, unet_weight=m)
    lf.add_deltas(d.unet, deltas)
    with torch.no_grad():
        for name, b in biases.items():
            d.unet.get_submodule(name).bias += b
    want = theirs(d)
    assert rel_err(base, want) > 1e-2
    assert rel_err(ours(pipe), want) < 1e-3


# --- exact undo, several LoRAs, dtypes and packed convs ---------------------------------------------------


def _two_files(pipe, tmp_path):
    """Two kohya files for a tiny-sd15 model with overlapping modules."""
    a = lf.ours_kohya(pipe, lambda t: "attn" in t.module or t.part != "unet", 5, rank=2, alpha=1.0)
    b = lf.ours_kohya(pipe, lambda t: "attn1" in t.module or "in_layers" in t.module, 6, rank=3)
    return save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")


def test_unload_is_exact_and_removing_one_leaves_the_other(tmp_path):
    pipe, only_b = tiny_pipe("tiny-sd15"), tiny_pipe("tiny-sd15")
    a, b = _two_files(pipe, tmp_path)
    parts = (pipe.unet, pipe.text_encoders)
    before = lf.state(*parts)
    stack = LoraStack(pipe.unet, pipe.text_encoders)
    assert stack.add(a, "a", 0.8) == [] and stack.add(b, "b", 0.6, te_weight=0.3) == []
    assert stack.weights == {"a": (0.8, 0.8), "b": (0.3, 0.6)}
    assert not lf.same_state(before, *parts)
    LoraStack(only_b.unet, only_b.text_encoders).add(b, "b", 0.6, te_weight=0.3)
    stack.remove("a")
    assert lf.same_state(lf.state(only_b.unet, only_b.text_encoders), *parts)  # bit for bit
    stack.add(b, "b", 0.2)  # the same name again: replaced, not stacked
    assert stack.weights == {"b": (0.2, 0.2)}
    stack.remove()
    assert lf.same_state(before, *parts) and stack.weights == {}
    with pytest.raises(KeyError, match="'a'"):
        stack.remove("a")


def test_bf16_with_packed_convs(tmp_path):
    dtype = torch.bfloat16 if speed.cpu_packs(torch.bfloat16) else torch.float32
    if not speed.cpu_packs(dtype):
        pytest.skip("oneDNN cannot pack conv weights on this CPU")
    fast, plain = tiny_pipe("tiny-sd15").to(dtype=dtype), tiny_pipe("tiny-sd15").to(dtype=dtype)
    fast.exact = False  # the CPU fast path: convs packed on the first call
    ours(fast)
    assert any(p.is_mkldnn for p in fast.unet.parameters())
    before = lf.state(fast.unet)
    path = save(lf.ours_kohya(plain, lambda t: t.part == "unet", 7), tmp_path / "k.safetensors")  # every conv too
    stack = apply(fast, path, unet_weight=0.7)
    apply(plain, path, unet_weight=0.7)
    assert lf.same_state(lf.state(plain.unet), fast.unet)  # the same bf16 merge with or without packing
    got = ours(fast)
    assert any(p.is_mkldnn for p in fast.unet.parameters())  # packed again on that call
    assert rel_err(got, ours(plain)) < 3e-2  # packed vs plain bf16 kernels (summation order)
    stack.remove()
    assert lf.same_state(before, fast.unet)
