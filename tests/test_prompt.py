"""A1111 emphasis parsing, 75-token chunking, multi-encoder prompt encoding and weighting."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb
from latentdiff.config import PRESETS
from latentdiff.models.text import Tokenizer, build_text_encoder
from latentdiff.prompt import BREAK, encode_prompts, parse_prompt_attention, prompt_chunks

A1111_EXAMPLES = [  # the doctests of A1111's modules/prompt_parser.py
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text,want", A1111_EXAMPLES)
def test_a1111_examples(text, want):
    assert parse_prompt_attention(text) == want  # exact floats: same multiplication order as A1111


def test_parse_more():
    assert parse_prompt_attention("[dim]") == [("dim", 1 / 1.1)]
    assert parse_prompt_attention("((a)) b") == [("a", 1.1 * 1.1), (" b", 1.0)]
    assert parse_prompt_attention("(a:0.25) (b:+2)") == [("a", 0.25), (" ", 1.0), ("b", 2.0)]
    assert parse_prompt_attention("(a:x)") == [("a:x", 1.1)]  # not a number: plain text in a plain bracket
    assert parse_prompt_attention("a) b] c:1.2)") == [("a) b] c:1.2)", 1.0)]  # nothing to close
    assert parse_prompt_attention("back\\\\slash \\x") == [("back\\slash \\x", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("()") == [("", 1.0)]
    assert parse_prompt_attention("a cat BREAK (a dog) BREAK BREAK") == [
        ("a cat", 1.0), BREAK, ("a dog", 1.1), BREAK, BREAK]
    assert parse_prompt_attention("BREAKFAST break") == [("BREAKFAST break", 1.0)]  # a word of its own only
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]  # marker never reweighted


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_chunks(tok):
    assert [len(c.ids) for c in prompt_chunks(tok, "a " * 200)] == [75, 75, 50]
    assert [len(c.ids) for c in prompt_chunks(tok, "a " * 150)] == [75, 75]
    assert [len(c.ids) for c in prompt_chunks(tok, "")] == [0]
    assert [c.ids for c in prompt_chunks(tok, "a cat BREAK a dog")] == [tok.encode("a cat"), tok.encode("a dog")]
    assert [c.ids for c in prompt_chunks(tok, "BREAK cat")] == [[], tok.encode("cat")]
    (c,) = prompt_chunks(tok, "a (red:1.5) apple")
    assert c.ids == tok.encode("a red apple") and c.weights == [1.0, 1.5, 1.0]
    (c,) = prompt_chunks(tok, "a (red:1.5) apple", weighting="none")
    assert c.ids == tok.encode("a (red:1.5) apple") and set(c.weights) == {1.0}
    with pytest.raises(ValueError, match="weighting must be 'a1111' or 'none'"):
        prompt_chunks(tok, "x", weighting="comfy")


@pytest.fixture(scope="module")
def sdxl_encoders():
    torch.manual_seed(0)
    encs = [build_text_encoder(c).eval() for c in PRESETS["tiny-sdxl"].text]  # CLIP-L 32 + bigG 64
    for i, e in enumerate(encs):
        perturb(e, i, std=0.02)
    return encs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: a different batch composition may pick a different matmul kernel."""
    return a.shape == b.shape and (a - b).abs().max().item() <= 1e-6


def _plain(tok, encoders, texts):
    """Reference: one plain 77-token encoding per text, encoders concatenated along features."""
    outs = [e(tok(texts, pad_id=e.cfg.pad_id)) for e in encoders]
    return torch.cat([z for z, _ in outs], dim=-1), outs[-1][1]


@torch.no_grad()
def test_single_chunk_equals_plain_encoding(tok, sdxl_encoders):
    prompts, negs = ["a photo of an astronaut, riding a horse!", "x"], ["blurry", ""]
    c, p, u, up = encode_prompts(tok, sdxl_encoders, prompts, negs)
    ref_c, ref_p = _plain(tok, sdxl_encoders, prompts)
    ref_u, ref_up = _plain(tok, sdxl_encoders, negs)
    assert c.shape == (2, 77, 96) and p.shape == (2, 64)
    assert _same(c, ref_c) and _same(p, ref_p) and _same(u, ref_u) and _same(up, ref_up)
    c1, p1, u1, up1 = encode_prompts(tok, sdxl_encoders, prompts)
    assert _same(c1, c) and _same(p1, p) and u1 is None and up1 is None


@torch.no_grad()
def test_long_prompt_chunks_and_negative_padding(tok, sdxl_encoders):
    words = "cat dog red blue tree house sky sun car man".split()
    prompt = " ".join(words[i % 10] for i in range(200))
    ids = tok.encode(prompt)
    assert len(ids) == 200
    c, p, u, up = encode_prompts(tok, sdxl_encoders, [prompt], [""])
    assert c.shape == (1, 3 * 77, 96) and u.shape == c.shape
    for j in range(3):  # each chunk is a plain encoding of its 75 tokens
        want = torch.cat([e(torch.tensor([tok.wrap(ids[75 * j: 75 * (j + 1)], e.cfg.pad_id)]))[0]
                          for e in sdxl_encoders], dim=-1)
        assert _same(c[:, 77 * j: 77 * (j + 1)], want)
    empty, empty_pooled = _plain(tok, sdxl_encoders, [""])
    assert all(_same(u[:, 77 * j: 77 * (j + 1)], empty) for j in range(3))  # padded with empty chunks
    assert _same(up, empty_pooled)
    # the pooled vector comes from the first chunk
    assert _same(p, sdxl_encoders[1](torch.tensor([tok.wrap(ids[:75], 0)]))[1])
    # a batch mixing a long and a short prompt pads the short one the same way
    c2, *_ = encode_prompts(tok, sdxl_encoders, [prompt, "short"], ["", ""])
    assert c2.shape == (2, 231, 96) and _same(c2[1:, 77:], torch.cat([empty, empty], dim=1))


@torch.no_grad()
def test_weighting_multiplies_then_restores_mean(tok, sdxl_encoders):
    c, p, _, _ = encode_prompts(tok, sdxl_encoders, ["a (red:1.5) [apple] tree"])
    plain_ids = tok.encode("a red apple tree")
    w = torch.tensor([1.0, 1.0, 1.5, 1 / 1.1, 1.0] + [1.0] * 72)  # start, a, red, apple, tree, end / pad
    parts = []
    for e in sdxl_encoders:
        z = e(torch.tensor([tok.wrap(plain_ids, e.cfg.pad_id)]))[0]  # (1, 77, W)
        zw = z * w[None, :, None]
        parts.append(zw * (z.mean() / zw.mean()))  # A1111 "Original": keep the unweighted mean
    want = torch.cat(parts, dim=-1)
    assert (c - want).abs().max() <= 1e-6
    unweighted = _plain(tok, sdxl_encoders, ["a red apple tree"])
    assert (c - unweighted[0]).abs().max() > 1e-3  # weighting really changed the context
    assert _same(p, unweighted[1])  # the pooled vector is not reweighted
    assert (c[..., :32].mean() - unweighted[0][..., :32].mean()).abs() <= 1e-6
    none, *_ = encode_prompts(tok, sdxl_encoders, ["a (red:1.5) [apple] tree"], weighting="none")
    assert _same(none, _plain(tok, sdxl_encoders, ["a (red:1.5) [apple] tree"])[0])


@torch.no_grad()
def test_break_starts_new_chunk(tok, sdxl_encoders):
    c, *_ = encode_prompts(tok, sdxl_encoders, ["a cat BREAK a dog"])
    assert c.shape == (1, 154, 96)
    assert _same(c[:, :77], _plain(tok, sdxl_encoders, ["a cat"])[0])
    assert _same(c[:, 77:], _plain(tok, sdxl_encoders, ["a dog"])[0])


@torch.no_grad()
def test_clip_skip_and_errors(tok):
    torch.manual_seed(0)
    enc = build_text_encoder(PRESETS["tiny-sd15"].text[0]).eval()
    perturb(enc, 0, std=0.02)
    c2, pooled, *_ = encode_prompts(tok, [enc], ["a cat"], clip_skip=2)
    assert pooled is None  # CLIP-L has no projection: SD1 has no pooled vector
    assert _same(c2, enc(tok(["a cat"]), layer_from_end=2)[0])
    assert not _same(c2, encode_prompts(tok, [enc], ["a cat"])[0])
    with pytest.raises(ValueError, match=r"clip_skip\) must be in \[1, 2\] for this text encoder, got 3"):
        encode_prompts(tok, [enc], ["a cat"], clip_skip=3)
    with pytest.raises(ValueError, match="negative has 2 prompts for 1 prompts"):
        encode_prompts(tok, [enc], ["a cat"], ["", ""])
