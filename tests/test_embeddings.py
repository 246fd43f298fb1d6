"""Textual-inversion embeddings: file formats, use by name in prompts (vs diffusers' load_textual_inversion),
emphasis and chunking of their positions, family checks, unsafe pickles, embeddings folders."""
from __future__ import annotations

import logging
import pathlib

import pytest
import safetensors.torch
import torch

from conftest import diffusers_twin, perturb, tiny_pipe
from latentdiff.adapters.embeddings import Embedding, check, load_dir, read_embedding, scan_dir
from latentdiff.config import PRESETS
from latentdiff.models.text import Tokenizer, build_text_encoder
from latentdiff.prompt import PLACEHOLDER, encode_prompts, prompt_chunks
from latentdiff.weights import CheckpointError

SD15_TEXT, SDXL_TEXT = PRESETS["tiny-sd15"].text, PRESETS["tiny-sdxl"].text  # widths (32,), (32, 64)


def _vec(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _a1111_pt(path: pathlib.Path, vectors: torch.Tensor) -> pathlib.Path:
    """The dict A1111's Embedding.save writes (textual_inversion.py)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem,
                "step": 500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "tiny"}, path)
    return path


def _st(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> pathlib.Path:
    safetensors.torch.save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def sd15_encoders():
    enc = build_text_encoder(SD15_TEXT[0]).eval()
    perturb(enc, 0, std=0.02)
    return [enc]


@pytest.fixture(scope="module")
def sdxl_encoders():
    encs = [build_text_encoder(c).eval() for c in SDXL_TEXT]
    for i, e in enumerate(encs):
        perturb(e, i, std=0.02)
    return encs


# --- files ------------------------------------------------------------------------------------------------


def test_formats(tmp_path):
    v3, v2, v1 = _vec(3, 32, 0), _vec(2, 32, 1), _vec(1, 32, 2)[0]
    emb = read_embedding(_a1111_pt(tmp_path / "TinyPos.pt", v3))
    assert emb.token == "TinyPos" and emb.n == 3 and torch.equal(emb.vectors[0], v3)  # token = file stem
    emb = read_embedding(_st(tmp_path / "neg.safetensors", {"emb_params": v2.half()}), token="other")
    assert emb.token == "other" and emb.vectors[0].dtype == torch.float32  # A1111 keeps float32 vectors
    assert torch.equal(emb.vectors[0], v2.half().float())
    torch.save({"emb_params": v2}, tmp_path / "kohya.pt")
    assert torch.equal(read_embedding(tmp_path / "kohya.pt").vectors[0], v2)
    # diffusers: {token: [W]}; its fixed file name takes the key as token, any other name the stem (A1111)
    (tmp_path / "concept").mkdir()
    torch.save({"<cat-toy>": v1}, tmp_path / "concept" / "learned_embeds.bin")
    emb = read_embedding(tmp_path / "concept" / "learned_embeds.bin")
    assert emb.token == "<cat-toy>" and emb.vectors[0].shape == (1, 32) and torch.equal(emb.vectors[0][0], v1)
    emb = read_embedding(_st(tmp_path / "cat.safetensors", {"<cat-toy>": v2}))
    assert emb.token == "cat" and emb.n == 2
    emb = read_embedding(_st(tmp_path / "xl.safetensors", {"clip_g": _vec(2, 64, 3), "clip_l": _vec(2, 32, 4)}))
    assert [tuple(v.shape) for v in emb.vectors] == [(2, 32), (2, 64)]  # clip_l first: encoder 0
    assert torch.equal(emb.vectors[1], _vec(2, 64, 3))
    check(emb, SDXL_TEXT)


def test_unreadable_files_name_the_file(tmp_path):
    cases = {
        "a.txt": (None, "must end in one of .pt, .bin, .safetensors"),
        "two.safetensors": ({"a": _vec(1, 32, 0), "b": _vec(1, 32, 1)}, "found keys \\['a', 'b'\\]"),
        "multi.pt": ({"string_to_param": {"*": _vec(1, 32, 0), "+": _vec(1, 32, 1)}}, "exactly one tensor"),
        "list.pt": ([_vec(1, 32, 0)], "expected a dict, found list"),
        "ints.safetensors": ({"emb_params": torch.zeros(2, 32, dtype=torch.int32)}, "float tensor"),
        "big.safetensors": ({"emb_params": _vec(76, 32, 0)}, "1 to 75 vectors"),
        "xl.safetensors": ({"clip_l": _vec(2, 32, 0), "clip_g": _vec(3, 64, 0)}, "same n"),
    }
    for name, (data, msg) in cases.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            _st(path, data)
        elif data is not None:
            torch.save(data, path)
        else:
            path.write_text("x")
        with pytest.raises(CheckpointError, match=msg) as e:
            read_embedding(path)
        assert str(path) in str(e.value)
    whole = _st(tmp_path / "ok.safetensors", {"e": _vec(2, 32, 0)}).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-8])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        read_embedding(tmp_path / "cut.safetensors")
    (tmp_path / "cut.pt").write_bytes(_a1111_pt(tmp_path / "ok.pt", _vec(2, 32, 0)).read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.pt: cannot read as a torch file"):
        read_embedding(tmp_path / "cut.pt")


class _Payload:
    """Unpickling this creates ``marker``: what a malicious pickle would do, harmlessly."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": _vec(1, 32, 0)}, "name": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"(?s)evil.pt: refused to load: torch.load\(weights_only=True\)"
                                              r".* rejects this pickle .*Unsupported global"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_wrong_family_is_an_error_naming_both_widths(tmp_path):
    sd1 = read_embedding(_a1111_pt(tmp_path / "sd1.pt", _vec(2, 32, 0)))
    xl = read_embedding(_st(tmp_path / "xl.safetensors", {"clip_l": _vec(2, 32, 0), "clip_g": _vec(2, 64, 1)}))
    check(sd1, SD15_TEXT)
    with pytest.raises(CheckpointError, match=r"sd1.pt: .* 'sd1' has vectors of width 32, but this model's "
                                              r"text encoder\(s\) expect width 32 \+ 64 \(clip_l \+ clip_g\)"):
        check(sd1, SDXL_TEXT)
    with pytest.raises(CheckpointError, match=r"xl.safetensors: .* width 32 \+ 64 \(clip_l \+ clip_g\), .* "
                                              r"expect width 32: it was trained for another model family"):
        check(xl, SD15_TEXT)
    with pytest.raises(CheckpointError, match="width 64, .* expect width 32"):
        check(read_embedding(_a1111_pt(tmp_path / "wide.pt", _vec(2, 64, 0))), SD15_TEXT)


def test_scan_and_load_dir(tmp_path, caplog):
    d = tmp_path / "embeddings"
    (d / "sub").mkdir(parents=True)
    _a1111_pt(d / "Alpha.pt", _vec(2, 32, 0))
    _st(d / "sub" / "beta.SAFETENSORS", {"emb_params": _vec(1, 32, 1)})
    torch.save({"<g>": _vec(1, 32, 2)[0]}, d / "sub" / "gamma.bin")
    _st(d / "xl.safetensors", {"clip_l": _vec(2, 32, 0), "clip_g": _vec(2, 64, 1)})  # another family
    _a1111_pt(d / "sub" / "Alpha.pt", _vec(3, 32, 3))  # same stem: the first in sorted order wins
    (d / "notes.txt").write_text("x")
    (d / ".hidden.pt").write_bytes(b"x")
    (d / "empty.pt").write_bytes(b"")
    assert scan_dir(d) == {"Alpha": d / "Alpha.pt", "beta": d / "sub" / "beta.SAFETENSORS",
                           "gamma": d / "sub" / "gamma.bin", "xl": d / "xl.safetensors"}
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        loaded = load_dir(d, SD15_TEXT)
    assert sorted(loaded) == ["Alpha", "beta", "gamma"] and loaded["Alpha"].n == 2
    assert loaded["gamma"].token == "gamma"  # in a folder the name is always the stem (A1111)
    assert "same name" in caplog.text and "embedding skipped: " in caplog.text and "xl.safetensors" in caplog.text
    assert sorted(load_dir(d, SDXL_TEXT)) == ["xl"]
    with pytest.raises(ValueError, match="embeddings_dir must be a directory"):
        scan_dir(d / "Alpha.pt")


# --- prompts ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sd15_matches_diffusers_load_textual_inversion(tmp_path):
    """A 3-vector A1111 .pt in the prompt, a 2-vector emb_params .safetensors in the negative (5.6)."""
    pipe = tiny_pipe("tiny-sd15")
    pos = _a1111_pt(tmp_path / "tinypos.pt", _vec(3, 32, 0))
    neg = _st(tmp_path / "tinyneg.safetensors", {"emb_params": _vec(2, 32, 1)})
    dpipe = diffusers_twin(pipe, tmp_path / "d")
    dpipe.load_textual_inversion(str(pos), token="tinypos")
    dpipe.load_textual_inversion(str(neg), token="tinyneg")  # emb_params: diffusers needs the token (5.3)
    prompt, negative = "a photo of tinypos, riding a horse", "blurry, tinyneg"
    pe, ne = dpipe.encode_prompt(prompt, "cpu", 1, True, negative)
    embs = {e.token: e for e in map(read_embedding, (pos, neg))}
    for e in embs.values():
        check(e, pipe.cfg.text)
    c, pooled, u, _ = encode_prompts(pipe.tokenizer, list(pipe.text_encoders), [prompt], [negative],
                                     embeddings=embs)
    assert c.shape == pe.shape == (1, 77, 32) and pooled is None
    assert (c - pe).abs().max() < 1e-5 and (u - ne).abs().max() < 1e-5
    plain, *_ = encode_prompts(pipe.tokenizer, list(pipe.text_encoders), [prompt])
    assert (plain - pe).abs().max() > 1e-2  # the embedding really changed the encoding


@torch.no_grad()
def test_sdxl_clip_l_clip_g_matches_diffusers(tmp_path):
    """diffusers loads an SDXL file in two calls, one per encoder and tokenizer (its docs, #8854)."""
    pipe = tiny_pipe("tiny-sdxl")
    sd = {"clip_l": _vec(2, 32, 0), "clip_g": _vec(2, 64, 1)}
    path = _st(tmp_path / "tinyxl.safetensors", sd)
    dpipe = diffusers_twin(pipe, tmp_path / "d")
    dpipe.load_textual_inversion(sd["clip_l"], token="tinyxl", text_encoder=dpipe.text_encoder,
                                 tokenizer=dpipe.tokenizer)
    dpipe.load_textual_inversion(sd["clip_g"], token="tinyxl", text_encoder=dpipe.text_encoder_2,
                                 tokenizer=dpipe.tokenizer_2)
    prompt, negative = "tinyxl, a red apple", "a dull tinyxl"
    pe, ne, pp, npp = dpipe.encode_prompt(prompt, device="cpu", negative_prompt=negative)
    emb = read_embedding(path)
    check(emb, pipe.cfg.text)
    c, p, u, up = encode_prompts(pipe.tokenizer, list(pipe.text_encoders), [prompt], [negative],
                                 embeddings={"tinyxl": emb})
    assert c.shape == pe.shape == (1, 77, 96) and p.shape == pp.shape == (1, 64)
    for ours, theirs in ((c, pe), (p, pp), (u, ne), (up, npp)):
        assert (ours - theirs).abs().max() < 1e-5
    plain, plain_pooled, *_ = encode_prompts(pipe.tokenizer, list(pipe.text_encoders), [prompt])
    assert (plain[..., :32] - pe[..., :32]).abs().max() > 1e-2  # clip_l vectors reached encoder 0
    assert (plain[..., 32:] - pe[..., 32:]).abs().max() > 1e-2 and (plain_pooled - pp).abs().max() > 1e-2


@torch.no_grad()
def test_weighting_multiplies_the_embedding_positions(tok, sd15_encoders):
    emb = Embedding("tinypos", [_vec(3, 32, 0)])
    embs = {"tinypos": emb}
    (chunk,) = prompt_chunks(tok, "a (tinypos:1.2), b", embeddings=embs)
    assert chunk.ids == [*tok.encode("a"), PLACEHOLDER, PLACEHOLDER, PLACEHOLDER, *tok.encode(", b")]
    assert chunk.weights == [1.0, 1.2, 1.2, 1.2, 1.0, 1.0] and chunk.fixes == [(1, emb)]
    z, *_ = encode_prompts(tok, sd15_encoders, ["a tinypos, b"], embeddings=embs)  # (1, 77, 32)
    w = torch.tensor([1.0, 1.0, 1.2, 1.2, 1.2] + [1.0] * 72)  # start, a, the 3 vectors, ", b", end / pad
    zw = z * w[None, :, None]
    want = zw * (z.mean() / zw.mean())  # A1111 "Original": multiply, then restore the mean
    got, *_ = encode_prompts(tok, sd15_encoders, ["a (tinypos:1.2), b"], embeddings=embs)
    assert (got - want).abs().max() <= 1e-6 and (got - z).abs().max() > 1e-3
    # case and surrounding punctuation do not matter (BPE ids, lower-cased); a longer word is another word
    same, *_ = encode_prompts(tok, sd15_encoders, ["a TinyPos, b"], embeddings=embs)
    assert torch.equal(same, z)
    assert prompt_chunks(tok, "tinyposx", embeddings=embs)[0].fixes == []


def test_embeddings_count_in_75_token_chunks(tok, sd15_encoders):
    emb = Embedding("tinypos", [_vec(3, 32, 0)])
    words = " ".join(["cat"] * 73)  # 73 tokens: the 3 vectors do not fit, so they open the next chunk (A1111)
    chunks = prompt_chunks(tok, f"{words} tinypos dog", embeddings={"tinypos": emb})
    assert [len(c.ids) for c in chunks] == [73, 4] and chunks[1].fixes == [(0, emb)]
    chunks = prompt_chunks(tok, f"{' '.join(['cat'] * 72)} tinypos dog", embeddings={"tinypos": emb})
    assert [len(c.ids) for c in chunks] == [75, 1] and chunks[0].fixes == [(72, emb)]
    with torch.no_grad():
        c, *_ = encode_prompts(tok, sd15_encoders, [f"{words} tinypos dog"], [""], embeddings={"tinypos": emb})
        first, *_ = encode_prompts(tok, sd15_encoders, [words])
        second, *_ = encode_prompts(tok, sd15_encoders, ["tinypos dog"], embeddings={"tinypos": emb})
    assert c.shape == (1, 154, 32)
    assert (c[:, :77] - first).abs().max() <= 1e-6 and (c[:, 77:] - second).abs().max() <= 1e-6


@torch.no_grad()
def test_longest_name_wins_and_wrong_vectors_are_refused(tok, sd15_encoders):
    short, long = Embedding("style", [_vec(1, 32, 0)]), Embedding("style two", [_vec(2, 32, 1)])
    (c,) = prompt_chunks(tok, "style two style", embeddings={"style": short, "style two": long})
    assert c.fixes == [(0, long), (2, short)] and len(c.ids) == 3
    wide = Embedding("wide", [_vec(1, 64, 0)], source="wide.pt")
    with pytest.raises(ValueError, match=r"embedding 'wide' \(wide.pt\) has no vectors of width 32 for text "
                                         r"encoder 0; check it"):
        encode_prompts(tok, sd15_encoders, ["a wide cat"], embeddings={"wide": wide})
    with pytest.raises(ValueError, match="1 to 75 vectors"):
        Embedding("x", [_vec(0, 32, 0)])


@torch.no_grad()
def test_prompts_without_embeddings_are_unchanged(tok, sdxl_encoders):
    prompts, negs = ["a (red:1.3) apple, highly detailed", "x " * 100], ["blurry", ""]
    ref = encode_prompts(tok, sdxl_encoders, prompts, negs)
    unused = {"tinyxl": Embedding("tinyxl", [_vec(2, 32, 0), _vec(2, 64, 1)])}
    for embs in ({}, unused):
        out = encode_prompts(tok, sdxl_encoders, prompts, negs, embeddings=embs)
        assert all(torch.equal(a, b) for a, b in zip(out, ref))  # bit for bit
    for enc in sdxl_encoders:  # both towers: inputs_embeds = the plain lookup gives the plain encoding
        ids = tok(prompts, pad_id=enc.cfg.pad_id)
        for a, b in zip(enc(ids), enc(ids, None, enc.embed_tokens(ids))):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(2, 77, \d+\)"):
            enc(ids, None, enc.embed_tokens(ids)[:, :76])


def test_pipeline_embeddings_folder_and_load_embedding_match_diffusers(tmp_path):
    """Wired through latentdiff.load: `embeddings/` next to the model, and pipe.load_embedding; final latents."""
    import diffusers

    import latentdiff

    src = tiny_pipe("tiny-sd15")
    src.save(tmp_path / "m.safetensors")
    (tmp_path / "embeddings").mkdir()
    pos = _a1111_pt(tmp_path / "embeddings" / "tinypos.pt", _vec(3, 32, 0))
    neg = _st(tmp_path / "tinyneg.safetensors", {"emb_params": _vec(2, 32, 1)})
    pipe = latentdiff.load(tmp_path / "m.safetensors", dtype=torch.float32)
    assert sorted(pipe.embeddings) == ["tinypos"]
    before = pipe("tinypos", steps=4, sampler="euler", output="latent", progress=False)
    assert pipe.load_embedding(neg) == "tinyneg"
    prompt, negative = "a photo of tinypos, riding a horse", "blurry, tinyneg"
    ours = pipe(prompt, negative_prompt=negative, steps=4, sampler="euler", guidance_scale=7.5,
                output="latent", progress=False)
    dpipe = diffusers_twin(src, tmp_path / "d")
    dpipe.load_textual_inversion(str(pos), token="tinypos")
    dpipe.load_textual_inversion(str(neg), token="tinyneg")
    dpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    theirs = dpipe(prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5, height=64,
                   width=64, generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3
    with pytest.raises(CheckpointError, match="width"):
        pipe.load_embedding(_st(tmp_path / "wide.safetensors", {"emb_params": _vec(2, 768, 2)}))
    assert sorted(pipe.embeddings) == ["tinyneg", "tinypos"]
    assert torch.equal(before, pipe("tinypos", steps=4, sampler="euler", output="latent", progress=False))
