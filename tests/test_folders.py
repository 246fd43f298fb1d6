"""diffusers folders both ways, save / convert round trips, and failed conversions that leave no trace."""
from __future__ import annotations

import pytest
import torch

import latentdiff
from latentdiff import cli, weights
from conftest import rel_err, tiny_pipe

PROMPT, NEG = "a watercolor fox in the snow", "ugly"


def _latents(pipe):
    return pipe(PROMPT, negative_prompt=NEG, steps=4, seed=0, height=64, width=64, output="latent", progress=False)


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sd21_v", "tiny-sdxl"])
def test_folder_saved_by_diffusers_loads_and_matches_single_file(preset, tmp_path):
    import diffusers

    pipe = tiny_pipe(preset)
    pipe.save(tmp_path / "x.safetensors")
    single = latentdiff.load(tmp_path / "x.safetensors", dtype=torch.float32)
    # a folder written by diffusers itself (save_pretrained), from our folder loaded into diffusers
    pipe.save(tmp_path / "ours", format="diffusers")
    dpipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", local_files_only=True)
    dpipe.save_pretrained(tmp_path / "by_diffusers", safe_serialization=True)
    folder = latentdiff.load(tmp_path / "by_diffusers", dtype=torch.float32)
    assert folder.cfg.prediction_type == pipe.cfg.prediction_type
    assert folder.cfg.unet == pipe.cfg.unet and folder.cfg.vae == pipe.cfg.vae
    a, b = _latents(single), _latents(folder)
    assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_single_folder_single_round_trip_is_identical(preset, tmp_path):
    pipe = tiny_pipe(preset)
    pipe.save(tmp_path / "a.safetensors")
    cli.main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "f"), "--to", "diffusers", "--dtype", "fp32"])
    cli.main(["convert", str(tmp_path / "f"), str(tmp_path / "b.safetensors"), "--dtype", "fp32"])
    a = weights.SafetensorsFile(tmp_path / "a.safetensors")
    b = weights.SafetensorsFile(tmp_path / "b.safetensors")
    # SDXL: logit_scale (unused, not in the diffusers format) comes back as 0; every other tensor is identical
    absent = {k for k in a.entries if k.endswith("logit_scale")}
    assert set(a.entries) == set(b.entries)
    for k in a.entries:
        if k not in absent:
            assert torch.equal(a.get(k), b.get(k)), k


def test_sd2_folder_restores_released_layout(tmp_path):
    pipe = tiny_pipe("tiny-sd21")
    pipe.save(tmp_path / "f", format="diffusers")
    again = latentdiff.load(tmp_path / "f", dtype=torch.float32)
    assert again.cfg.text == pipe.cfg.text  # the 24-block-style tower, last block zero-filled
    c1 = pipe.encode_prompt(PROMPT)
    c2 = again.encode_prompt(PROMPT)
    assert torch.equal(c1.context, c2.context)


def test_convert_dtype_and_failed_convert_writes_nothing(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    pipe.save(tmp_path / "a.safetensors")
    cli.main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "h.safetensors"), "--dtype", "bf16"])
    h = weights.SafetensorsFile(tmp_path / "h.safetensors")
    assert {e[0] for k, e in h.entries.items()} == {torch.bfloat16}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit, match="bad.safetensors"):
        cli.main(["convert", str(bad), str(tmp_path / "out"), "--to", "diffusers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_save_refuses_to_overwrite_a_foreign_folder(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a diffusers folder"):
        pipe.save(tmp_path / "notes", format="diffusers")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_folder_with_missing_component_is_named(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    pipe.save(tmp_path / "f", format="diffusers")
    (tmp_path / "f" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(weights.CheckpointError, match="vae"):
        latentdiff.load(tmp_path / "f")
