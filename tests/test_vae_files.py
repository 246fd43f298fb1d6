"""Standalone VAE files (issue #23 item 4): every layout users download, against diffusers'
AutoencoderKL.from_single_file of the same file; checkpoints without a VAE; bad files that change nothing."""
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from latentdiff.weights import CONFIG_KEY, CheckpointError, state_dict_of
from latentdiff.weights.diffusers.vae import to_diffusers

from conftest import diffusers_twin, tiny_pipe

diffusers = pytest.importorskip("diffusers")

LATENTS = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _other_vae(seed=7):
    """A VAE file's weights: the tiny model's VAE with other values."""
    pipe = tiny_pipe("tiny-sd15", seed=seed)
    return {k: v.contiguous() for k, v in pipe.vae.state_dict().items()}


def _decoded(pipe):
    return pipe.decode(LATENTS * pipe.cfg.vae.scaling_factor)


def _theirs(path, folder):
    vae = diffusers.AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae",
                                                   local_files_only=True)
    with torch.no_grad():
        return vae.decode(LATENTS).sample


def _pil_tensor(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32))


@pytest.mark.parametrize("layout", ["plain", "prefixed", "ckpt", "diffusers_file", "diffusers_folder"])
def test_vae_file_layouts_match_diffusers(tmp_path, layout):
    pipe = tiny_pipe("tiny-sd15")
    folder = tmp_path / "d"
    diffusers_twin(pipe, folder)
    sd = _other_vae()
    path = tmp_path / "vae.safetensors"
    if layout == "plain":
        save_file(sd, path)
    elif layout == "prefixed":  # as cut from a full checkpoint, with a .ckpt's training leftovers
        save_file({**{f"first_stage_model.{k}": v for k, v in sd.items()},
                   "loss.discriminator.main.0.weight": torch.zeros(2), "model_ema.decay": torch.tensor(0.99)}, path)
    elif layout == "ckpt":
        path = tmp_path / "vae.pt"
        torch.save({"state_dict": sd}, path)
    else:
        path = tmp_path / "vae" if layout == "diffusers_folder" else path
        path.mkdir(exist_ok=True) if layout == "diffusers_folder" else None
        file = path / "diffusion_pytorch_model.safetensors" if layout == "diffusers_folder" else path
        save_file({k: v.contiguous() for k, v in to_diffusers(sd, pipe.cfg.vae).items()}, file)
    pipe.load_vae(path)
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(v, sd[k]), k
    if layout in ("plain", "prefixed"):  # diffusers' single-file loader reads these two
        ours = pipe.vae.decode(LATENTS).float()
        theirs = _theirs(path, folder)
        assert (ours - theirs).abs().max() < 1e-4


def test_load_with_vae_argument_and_sibling_file(tmp_path, caplog):
    pipe = tiny_pipe("tiny-sd15")
    pipe.save(tmp_path / "m.safetensors")
    sd = _other_vae()
    save_file(sd, tmp_path / "other.safetensors")
    a = latentdiff.load(tmp_path / "m.safetensors", dtype=torch.float32, vae=tmp_path / "other.safetensors")
    assert all(torch.equal(v, sd[k]) for k, v in a.vae.state_dict().items())
    save_file(sd, tmp_path / "m.vae.safetensors")  # A1111's rule: <model>.vae.safetensors next to the model
    with caplog.at_level(logging.INFO, "latentdiff"):
        b = latentdiff.load(tmp_path / "m.safetensors", dtype=torch.float32)
    assert all(torch.equal(v, sd[k]) for k, v in b.vae.state_dict().items())
    assert "m.vae.safetensors" in caplog.text
    assert b.cfg.vae.scaling_factor == pipe.cfg.vae.scaling_factor


def test_checkpoint_without_vae_needs_vae_argument(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders}
    full = state_dict_of(pipe.cfg, modules)
    save_file({k: v.contiguous() for k, v in full.items() if not k.startswith("first_stage_model.")},
              tmp_path / "novae.safetensors", {CONFIG_KEY: pipe.cfg.to_json()})
    with pytest.raises(CheckpointError, match=r"novae.safetensors: holds no VAE weights.*vae="):
        latentdiff.load(tmp_path / "novae.safetensors")
    save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()}, tmp_path / "vae.safetensors")
    again = latentdiff.load(tmp_path / "novae.safetensors", dtype=torch.float32, vae=tmp_path / "vae.safetensors")
    assert torch.equal(again.vae.decode(LATENTS), pipe.vae.decode(LATENTS))


@pytest.mark.parametrize("bad, match", [
    ("no_decoder", r"bad.safetensors: no decoder\.\* keys"),
    ("wrong_shape", r"bad.safetensors: .*shape mismatches: decoder.conv_in.weight"),
    ("unknown_key", r"bad.safetensors: .*unexpected keys: decoder.extra.weight"),
    ("truncated", r"bad.safetensors: .*truncated"),
])
def test_bad_vae_files_are_named_and_change_nothing(tmp_path, bad, match):
    pipe = tiny_pipe("tiny-sd15")
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    sd = _other_vae()
    path = tmp_path / "bad.safetensors"
    if bad == "no_decoder":
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    elif bad == "wrong_shape":
        sd["decoder.conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    elif bad == "unknown_key":
        sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, path)
    if bad == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=match):
        pipe.load_vae(path)
    assert all(torch.equal(v, before[k]) for k, v in pipe.vae.state_dict().items())


def test_half_precision_decode_that_overflows_is_redone_in_fp32(caplog):
    pipe = tiny_pipe("tiny-sd15")
    ref = _pil_tensor(_decoded(pipe)[0])
    pipe.to(dtype=torch.float16)
    pipe.exact = True
    orig = pipe.vae.decode

    def overflowing(z):  # the fp16 pass overflows (as SDXL's VAE does); the fp32 retry is the real decode
        out = orig(z)
        return out * float("inf") if z.dtype == torch.float16 else out
    pipe.vae.decode = overflowing
    with caplog.at_level(logging.WARNING, "latentdiff"):
        img = _pil_tensor(_decoded(pipe)[0])
    assert "non-finite" in caplog.text
    assert (img - ref).abs().max() <= 2  # fp16 weights against fp32 ones: a level or two of 255
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.float16
