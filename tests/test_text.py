"""Tokenizer vs open_clip, text encoders vs transformers / diffusers' own conversion, released key layouts."""
from __future__ import annotations

import open_clip
import pytest
import torch
import transformers

from conftest import layout, perturb
from latentdiff.config import PRESETS, TextEncoderConfig
from latentdiff.weights.diffusers import text as dtext
from latentdiff.models.text import CLIPTextEncoder, OpenCLIPTextEncoder, Tokenizer, build_text_encoder

PROMPTS = [
    "", "a photo of a cat", "A PHOTO OF A CAT", "!!!", "hello, world!", "  lots   of\n\twhitespace  ",
    "café naïve résumé", "東京タワーの夜景", "emoji 🐱🚀✨ party", "tom &amp; jerry &lt;3", "&amp;amp; twice",
    "it's, they're, we'll, I'd", "numbers 12345 and 3.14159", "(emphasis:1.3) [brackets] {braces}",
    "mojibake: cafÃ©", "hyphen-ated under_score snake_case", "email@example.com https://x.org/a?b=c",
    "a " * 100, "word " * 80 + "tail", "über-long " * 40, "<start_of_text> literal specials <end_of_text>",
]
TOL = 1e-4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_tokenizer_matches_open_clip(tok):
    assert len(PROMPTS) >= 20
    ref = open_clip.tokenize(PROMPTS)  # (B, 77), pads with 0
    assert torch.equal(tok(PROMPTS, pad_id=0), ref)
    ours = tok(PROMPTS)  # CLIP-L padding: the end token repeated
    for row, r in zip(ours, ref):
        n = int((r == 49407).nonzero()[0]) + 1
        assert torch.equal(row[:n], r[:n]) and (row[n:] == 49407).all()
    assert tok.encode("a photo of a cat") == ref[1, 1:6].tolist()


def test_bpe_matches_open_clip_on_a_large_corpus(tok):
    """Our BPE (no open_clip import) against open_clip's SimpleTokenizer, untruncated: every shapes caption
    word, 3,000 vocabulary entries glued into made-up words, and the prompts above."""
    import random

    from latentdiff.datasets import shapes

    ref = open_clip.tokenizer.SimpleTokenizer(clean="lower")
    assert tok._bpe.encoder == ref.encoder and tok._bpe.ranks == ref.bpe_ranks
    rng = random.Random(0)
    pieces = [w.removesuffix("</w>") for w in rng.sample(sorted(ref.encoder), 3000)]
    texts = [*PROMPTS, *shapes.eval_fixed_captions(),
             *(" ".join("".join(rng.sample(pieces, rng.randint(1, 3))) for _ in range(8)) for _ in range(300))]
    for t in texts:
        assert tok.encode(t) == ref.encode(t), t


def test_importing_latentdiff_does_not_import_open_clip():
    """open_clip costs 2.6 s of import (1.4 s of it torchvision, which transformers' CLIPTextModel also
    imports on its own): only OpenCLIP text towers load it."""
    import subprocess
    import sys

    code = ("import sys, latentdiff; p = latentdiff.from_config('tiny-sd15'); p('a cat', steps=1, height=32, "
            "width=32); assert 'open_clip' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tokenizer_layout(tok):
    ids = tok(["!!!", "word " * 80], pad_id=0)
    assert tok.encode("!!!") == [995]  # "!!!</w>": typed "!" stays a token, padding is a separate setting
    assert ids[0, :4].tolist() == [49406, 995, 49407, 0] and (tok(["!!!"])[0, 3:] == 49407).all()
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407 and len(tok.encode("word " * 80)) == 80  # truncated to 75
    assert torch.equal(tok("a cat"), tok(["a cat"]))


def _hf_load(model: torch.nn.Module, sd: dict) -> None:
    """Load ``text_model.*`` names into a transformers model whatever its version's own key names are."""
    own = model.state_dict()
    fixed = {k if k in own else k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(fixed, strict=True)


def _ours(cfg: TextEncoderConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    enc = build_text_encoder(cfg).eval()
    perturb(enc, seed, std=0.02)
    return enc


def _ids(tok, cfg):
    return tok(["a photo of an astronaut riding a horse", "", "!!! (weird) prompt 🐱", "word " * 90],
               pad_id=cfg.pad_id)


@pytest.mark.parametrize("preset,index", [("tiny-sd15", 0), ("tiny-sdxl", 0)])
@torch.no_grad()
def test_clip_matches_transformers(tok, preset, index):
    cfg = PRESETS[preset].text[index]
    enc = _ours(cfg)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**dtext.diffusers_config(cfg, "sd1"))).eval()
    _hf_load(hf, dtext.to_diffusers(enc.state_dict(), cfg, "sd1"))
    ids = _ids(tok, cfg)
    ref = hf(input_ids=ids, output_hidden_states=True)
    hidden, pooled = enc(ids)
    # diffusers: SD1 uses last_hidden_state; SDXL's CLIP-L uses hidden_states[-2] without the final norm
    want = ref.last_hidden_state if preset == "tiny-sd15" else ref.hidden_states[-2]
    assert hidden.shape == (4, 77, cfg.width)
    assert (hidden - want).abs().max() <= TOL
    assert (pooled - ref.pooler_output).abs().max() <= TOL
    if preset == "tiny-sd15":  # clip_skip 2 (A1111) == diffusers clip_skip=1: hidden_states[-2] + final norm
        skip = getattr(hf, "text_model", hf).final_layer_norm(ref.hidden_states[-2])
        assert (enc(ids, layer_from_end=2)[0] - skip).abs().max() <= TOL
        assert (enc(ids, layer_from_end=2)[0] - want).abs().max() > 1e-2  # a different layer really


@pytest.mark.parametrize("preset,index", [("tiny-sd21", 0), ("tiny-sdxl", 1)])
@torch.no_grad()
def test_open_clip_matches_diffusers_conversion(tok, preset, index):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    cfg = PRESETS[preset].text[index]
    enc = _ours(cfg)
    prefix = "cond_stage_model.model." if preset == "tiny-sd21" else "conditioner.embedders.1.model."
    single = {prefix + k.removeprefix("model."): v for k, v in enc.state_dict().items()}
    conf = transformers.CLIPTextConfig(**dtext.diffusers_config(cfg, "sdxl"))
    # diffusers' SD2 conversion ignores text_projection (its 24-block cut only applies at full size)
    sd2 = preset == "tiny-sd21"
    full = (transformers.CLIPTextModel(conf) if sd2 else transformers.CLIPTextModelWithProjection(conf)).eval()
    theirs = convert_open_clip_checkpoint(full, single, prefix=prefix)
    if preset == "tiny-sdxl":  # our converter writes exactly what diffusers' single-file loader builds
        ours = dtext.to_diffusers(enc.state_dict(), cfg, "sdxl")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    _hf_load(full, theirs)
    ids = _ids(tok, cfg)
    ref = full(input_ids=ids, output_hidden_states=True)
    hidden, pooled = enc(ids)
    norm = getattr(full, "text_model", full).final_layer_norm
    want = norm(ref.hidden_states[-2]) if cfg.final_norm else ref.hidden_states[-2]  # SD2: with ln_final
    assert (hidden - want).abs().max() <= TOL
    want_pooled = ref.pooler_output @ enc.model.text_projection if sd2 else ref.text_embeds  # SDXL's pooled
    assert (pooled - want_pooled).abs().max() <= TOL
    last = norm(ref.hidden_states[-1]) if cfg.final_norm else ref.hidden_states[-1]
    assert (enc(ids, layer_from_end=1)[0] - last).abs().max() <= TOL


@torch.no_grad()
def test_sd2_folder_is_cut_and_restores(tok):
    cfg = PRESETS["tiny-sd21"].text[0]
    enc = _ours(cfg)
    folder = dtext.to_diffusers(enc.state_dict(), cfg, "sd2")
    conf = dtext.diffusers_config(cfg, "sd2")
    assert conf["num_hidden_layers"] == cfg.layers - 1 and conf["architectures"] == ["CLIPTextModel"]
    assert not any(k.startswith(f"text_model.encoder.layers.{cfg.layers - 1}.") for k in folder)
    assert "text_projection.weight" not in folder
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**conf)).eval()
    _hf_load(hf, folder)  # strict: nothing unused is kept
    ids = _ids(tok, cfg)
    hidden, _ = enc(ids)
    assert (hidden - hf(input_ids=ids).last_hidden_state).abs().max() <= TOL  # diffusers' SD2 context

    back = dtext.from_diffusers(folder, cfg, "sd2")
    absent = dtext.absent_in_diffusers(cfg, "sd2")
    assert set(absent) == {k for k in enc.state_dict() if k not in back or not back[k].any()}
    assert len(absent) == 12 + 2 and "model.logit_scale" in absent and "model.text_projection" in absent
    with torch.device("meta"):
        restored = build_text_encoder(cfg)
    restored.load_state_dict(back, strict=True, assign=True)
    assert torch.equal(restored(ids)[0], hidden)  # a zero block is the identity: same conditioning


def test_sd2_absent_keys_equal_diffusers_ignore_list():
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    ours = dtext.absent_in_diffusers(PRESETS["sd21"].text[0], "sd2")  # full size, built on meta
    # diffusers lists the cut block and the projection; logit_scale it never maps at all
    assert "model.logit_scale" in ours
    assert sorted(set(ours) - {"model.logit_scale"}) == sorted(
        k.removeprefix("cond_stage_model.") for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    assert dtext.absent_in_diffusers(PRESETS["sdxl"].text[1], "sdxl") == ["model.logit_scale"]
    assert dtext.diffusers_config(PRESETS["sd21"].text[0], "sd2")["num_hidden_layers"] == 23


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21", "tiny-sdxl"])
def test_diffusers_round_trip(preset):
    role = {"tiny-sd15": "sd1", "tiny-sd21": "sd2", "tiny-sdxl": "sdxl"}[preset]
    for cfg in PRESETS[preset].text:
        sd = _ours(cfg).state_dict()
        folder = dtext.to_diffusers(sd, cfg, role)
        flat = {k.removeprefix("text_model."): v for k, v in folder.items()}  # transformers 5.x save names
        for d in (folder, flat | {"embeddings.position_ids": torch.arange(77)[None]}):
            back = dtext.from_diffusers(d, cfg, role)
            assert back.keys() == sd.keys()
            absent = set(dtext.absent_in_diffusers(cfg, role))
            assert all(torch.equal(back[k], sd[k]) for k in sd if k not in absent)
            assert all(not back[k].any() for k in absent)


def test_converter_errors():
    clip, oc = PRESETS["tiny-sd15"].text[0], PRESETS["tiny-sd21"].text[0]
    with pytest.raises(ValueError, match="role must be one of"):
        dtext.to_diffusers({}, clip, "sd3")
    with pytest.raises(ValueError, match="needs a text encoder of kind 'open_clip'"):
        dtext.diffusers_config(clip, "sd2")
    with pytest.raises(ValueError, match="unexpected diffusers text encoder key"):
        dtext.from_diffusers({"text_model.encoder.layers.0.bogus.weight": torch.zeros(1)}, oc, "sdxl")
    with pytest.raises(ValueError, match="needs q, k and v"):
        dtext.from_diffusers({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)}, oc, "sdxl")


def test_sd15_named_state_dict_loads_strictly(tok):
    cfg = PRESETS["tiny-sd15"].text[0]
    src = _ours(cfg, seed=3)
    # what a released file holds: prefixed names plus the position_ids buffer (stored as float by some files)
    file = {"cond_stage_model." + k: v.half() for k, v in src.state_dict().items()}
    file["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    sd = {k.removeprefix("cond_stage_model."): v.float() for k, v in file.items() if not k.endswith("position_ids")}
    with torch.device("meta"):
        enc = build_text_encoder(cfg)
    enc.load_state_dict(sd, strict=True, assign=True)
    assert not any(t.is_meta for t in [*enc.parameters(), *enc.buffers()])
    ids = _ids(tok, cfg)
    with torch.no_grad():
        assert (enc(ids)[0] - src(ids)[0]).abs().max() <= 1e-2  # fp16 storage
    with pytest.raises(RuntimeError, match="position_ids"):  # it is not a weight of ours
        enc.load_state_dict(dict(sd, **{"transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}))


@pytest.mark.parametrize("name,prefixes", [
    ("sd15", ["cond_stage_model."]),
    ("sd21", ["cond_stage_model."]),
    ("sdxl", ["conditioner.embedders.0.", "conditioner.embedders.1."]),
])
def test_full_size_keys_equal_released_layout(name, prefixes):
    released = layout(name)
    for cfg, prefix in zip(PRESETS[name].text, prefixes, strict=True):
        with torch.device("meta"):
            enc = build_text_encoder(cfg)
        want = {k[len(prefix):]: tuple(v[0]) for k, v in released.items()
                if k.startswith(prefix) and not k.endswith("position_ids")}
        got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
        assert got == want


def test_errors(tok):
    cfg = PRESETS["tiny-sd15"].text[0]
    enc = _ours(cfg)
    with pytest.raises(ValueError, match=r"clip_skip\) must be in \[1, 2\]"):
        enc(tok(["x"]), layer_from_end=3)
    with pytest.raises(ValueError, match="kind must be 'clip' or 'open_clip'"):
        build_text_encoder(TextEncoderConfig(kind="t5"))
    with pytest.raises(ValueError, match="needs kind 'open_clip'"):
        OpenCLIPTextEncoder(cfg)
    with pytest.raises(ValueError, match="needs kind 'clip'"):
        CLIPTextEncoder(PRESETS["tiny-sd21"].text[0])
