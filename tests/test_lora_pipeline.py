"""LoRAs through the pipeline: load_lora / unload_lora, A1111 prompt tags, PNG hashes, and bad files that leave
the model exactly as it was."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

import latentdiff
import lora_files as lf
from conftest import tiny_pipe
from latentdiff.images import parse_parameters
from latentdiff.weights import CheckpointError


def latents(pipe, prompt="a red apple", **kw):
    return pipe(prompt, negative_prompt="blurry", steps=3, seed=0, sampler="euler", output="latent",
                progress=False, **kw)


def save(sd, path, metadata=None):
    safetensors.torch.save_file(sd, str(path), metadata=metadata)
    return path


@pytest.fixture
def model(tmp_path):
    """A tiny SD 1.x single file, with a kohya LoRA (U-Net and text encoder) in loras/ next to it."""
    src = tiny_pipe("tiny-sd15")
    src.save(tmp_path / "m.safetensors")
    (tmp_path / "loras").mkdir()
    save(lf.ours_kohya(src, lambda t: "attn" in t.module or t.part != "unet", 3), tmp_path / "loras" / "style.safetensors",
         {"ss_output_name": "styleAlias"})
    return tmp_path


def test_tag_equals_load_lora_and_calls_without_tags_are_the_base(model):
    pipe = latentdiff.load(model / "m.safetensors", dtype=torch.float32)
    base = latents(pipe)
    tagged = latents(pipe, "a red apple <lora:style:0.8>")
    assert pipe.loras == {}  # the tag applied to that call only
    assert torch.equal(latents(pipe), base)
    assert pipe.load_lora(model / "loras" / "style.safetensors", 0.8) == "style"
    assert pipe.loras == {"style": (0.8, 0.8)}
    assert torch.equal(latents(pipe, "a red apple "), tagged)  # the tag's text is cut: "a red apple "
    assert not torch.equal(tagged, base)
    pipe.unload_lora()
    assert torch.equal(latents(pipe), base)
    two = latents(pipe, "<lyco:styleAlias:0.5:0.8> a red apple")  # te 0.5, unet 0.8, found by ss_output_name
    pipe.load_lora(model / "loras" / "style.safetensors", 0.8, text_encoder_weight=0.5)
    assert torch.equal(latents(pipe, " a red apple"), two)


def test_png_carries_lora_hashes_and_the_tags(model):
    pipe = latentdiff.load(model / "m.safetensors", dtype=torch.float32)
    image = pipe("a red apple <lora:style:0.8>", steps=2, progress=False)[0]
    text = image.info["parameters"]
    assert text.startswith("a red apple <lora:style:0.8>\n")
    from latentdiff.adapters.tags import short_hash

    h = short_hash(model / "loras" / "style.safetensors")
    assert f'Lora hashes: "style: {h}"' in text and len(h) == 12
    assert parse_parameters(text)["prompt"] == "a red apple <lora:style:0.8>"


def test_missing_lora_tag_names_the_folders(model):
    pipe = latentdiff.load(model / "m.safetensors", dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="LoRA 'nope' not found.*loras"):
        latents(pipe, "x <lora:nope:1>")
    assert pipe.loras == {}


def _unchanged(pipe):
    before = lf.state(pipe.unet, *pipe.text_encoders)
    return lambda: lf.same_state(before, pipe.unet, *pipe.text_encoders)


def test_sdxl_lora_on_sd1_model_is_named(tmp_path):
    xl, pipe = tiny_pipe("tiny-sdxl"), tiny_pipe("tiny-sd15")
    path = save(lf.ours_kohya(xl, lambda t: t.part != "unet" or "attn2" in t.module, 1), tmp_path / "xl.safetensors")
    same = _unchanged(pipe)
    with pytest.raises(CheckpointError, match=r"xl.safetensors: .*This LoRA targets SDXL \(lora_te2_ keys.*"
                                              r"the model is SD 1.x"):
        pipe.load_lora(path)
    assert same() and pipe.loras == {}


def test_keys_for_no_module_strict_and_not(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    sd = lf.ours_kohya(pipe, lambda t: "attn1" in t.module, 2)
    sd["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(4, 2)
    path = save(sd, tmp_path / "odd.safetensors")
    same = _unchanged(pipe)
    with pytest.raises(CheckpointError, match=r"odd.safetensors: 2 keys match no module.*lora_unet_no_such_module"):
        pipe.load_lora(path)
    assert same()
    pipe.load_lora(path, strict=False)  # the rest applies; the two keys are logged
    assert not same() and pipe.loras == {"odd": (1.0, 1.0)}
    from latentdiff.adapters.lora import LoraStack

    assert sorted(LoraStack(tiny_pipe("tiny-sd15").unet, pipe.text_encoders).add(path, strict=False)) == [
        "lora_unet_no_such_module.lora_down.weight", "lora_unet_no_such_module.lora_up.weight"]


def test_truncated_file_and_shape_mismatch_change_nothing(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    sd = lf.ours_kohya(pipe, lambda t: "attn" in t.module, 4)
    good = save(sd, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-64])
    same = _unchanged(pipe)
    with pytest.raises(CheckpointError, match="cut.safetensors: .*truncated"):
        pipe.load_lora(cut)
    key = next(k for k in sd if k.endswith("attn1_to_q.lora_up.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    with pytest.raises(CheckpointError, match=r"wrong.safetensors: 1 modules do not fit .*attn1_to_q"):
        pipe.load_lora(save(sd, tmp_path / "wrong.safetensors"))
    assert same() and pipe.loras == {}


def test_cli_merge_lora_lora_info_and_generate_with_lora(model, tmp_path, capsys):
    from latentdiff import cli

    lora = model / "loras" / "style.safetensors"
    cli.main(["lora-info", str(lora)])
    info = capsys.readouterr().out
    assert '"format": "kohya"' in info and '"ranks": [\n    4\n  ]' in info
    out = tmp_path / "merged.safetensors"
    cli.main(["merge-lora", str(model / "m.safetensors"), f"{lora}:0.7", "-o", str(out), "--dtype", "fp32"])
    merged = latentdiff.load(out, dtype=torch.float32)
    pipe = latentdiff.load(model / "m.safetensors", dtype=torch.float32)
    pipe.load_lora(lora, 0.7)
    assert torch.equal(latents(merged), latents(pipe))
    with pytest.raises(SystemExit, match="is the base model itself"):
        cli.main(["merge-lora", str(out), "style", "-o", str(out)])
    png = tmp_path / "x.png"
    cli.main(["generate", "a red apple", "-m", str(model / "m.safetensors"), "--lora", "style:0.7", "--steps", "2",
              "-H", "64", "-W", "64", "-o", str(png), "-q", "--dtype", "fp32"])
    assert png.is_file()
