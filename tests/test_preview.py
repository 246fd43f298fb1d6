"""The preview decoder (issue #7): shapes, training learns the VAE's decode, the shipped one is close to the VAE,
and its files are checked like any checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from conftest import tiny_pipe
from latentdiff.models.preview import PreviewConfig, PreviewDecoder
from latentdiff.weights.preview import save_preview
from latentdiff.train import preview as train_preview
from latentdiff.weights import CheckpointError


def test_preview_decoder_shapes():
    model = PreviewDecoder(PreviewConfig(latent_channels=4, upsamples=3, width=8))
    assert model(torch.randn(2, 4, 8, 6)).shape == (2, 3, 64, 48)
    assert PreviewConfig.from_metadata(model.cfg.to_metadata()) == model.cfg


def test_training_learns_the_vae_decode(tmp_path):
    """Sixty steps on the shipped shapes model's VAE (a trained one: a random VAE decodes to near-constant
    images): the preview's PSNR against the VAE decode of held-out latents beats the untrained decoder's by a
    wide margin; the file round-trips through load_preview."""
    from latentdiff.datasets.shapes import sample_batch

    pipe = latentdiff.load("shapes", dtype=torch.float32)
    z, y = train_preview.latents_and_targets(pipe.vae, sample_batch(16, seed=1)[0])
    assert z.shape == (16, 4, 16, 16) and y.shape == (16, 3, 64, 64)  # the shipped VAEs downsample 4x
    torch.manual_seed(0)
    with torch.inference_mode():
        untrained = train_preview.psnr(PreviewDecoder(PreviewConfig(width=train_preview.WIDTH))(z), y)
    model = train_preview.train(pipe.vae, sample_batch(96, seed=0)[0], steps=60, batch=16, lr=3e-3, log_every=0)
    with torch.inference_mode():
        trained = train_preview.psnr(model(z), y)
    assert trained > untrained + 6, (untrained, trained)  # measured: 6.1 -> 16.1 dB
    save_preview(model, tmp_path / "m.preview.safetensors")
    pipe.load_preview(tmp_path / "m.preview.safetensors")
    got = np.asarray(pipe.preview(z[:1])[0], dtype=np.float32)
    with torch.inference_mode():
        want = ((model(z[:1]).clamp(-1, 1) + 1) * 127.5)[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 1.0  # fp16 weights in the file, uint8 out


def test_no_preview_decoder_is_a_clear_error():
    pipe = tiny_pipe("tiny-sd15")
    with pytest.raises(RuntimeError, match="no preview decoder.*latentdiff.train.preview"):
        pipe.preview(torch.zeros(1, 4, 8, 8))


def test_load_preview_rejects_foreign_and_mismatched_files(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="foreign.safetensors: not a preview decoder"):
        pipe.load_preview(tmp_path / "foreign.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "bare.safetensors", metadata={"format": "latentdiff-preview"})
    with pytest.raises(CheckpointError, match="bare.safetensors: preview decoder metadata .* lacks or garbles"):
        pipe.load_preview(tmp_path / "bare.safetensors")
    wide = PreviewDecoder(PreviewConfig(latent_channels=16, upsamples=3, width=8))
    save_preview(wide, tmp_path / "sd3.preview.safetensors")
    with pytest.raises(CheckpointError, match="16 latent channels, this model's VAE has 4"):
        pipe.load_preview(tmp_path / "sd3.preview.safetensors")
    model = PreviewDecoder(PreviewConfig(upsamples=3, width=8))
    sd = {k: v.half() for k, v in model.state_dict().items()}
    del sd["layers.0.bias"]
    save_file(sd, tmp_path / "cut.preview.safetensors", metadata={**model.cfg.to_metadata(),
                                                                  "format": "latentdiff-preview"})
    with pytest.raises(CheckpointError, match="cut.preview.safetensors: does not match .* 1 missing keys: layers.0.bias"):
        pipe.load_preview(tmp_path / "cut.preview.safetensors")
    assert pipe.preview_decoder is None  # nothing half-loaded


def test_load_picks_up_a_preview_next_to_the_model(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    pipe.save(tmp_path / "m.safetensors")
    assert latentdiff.load(tmp_path / "m.safetensors").preview_decoder is None
    save_preview(PreviewDecoder(PreviewConfig(upsamples=3, width=8)),
                               tmp_path / "m.preview.safetensors")
    again = latentdiff.load(tmp_path / "m.safetensors")
    assert again.preview_decoder.cfg.width == 8
    again.save(tmp_path / "copy.safetensors")  # the preview travels with a saved single file
    assert latentdiff.load(tmp_path / "copy.safetensors").preview_decoder.cfg.width == 8
    with pytest.raises(FileNotFoundError) as e:  # preview files are not listed as models
        latentdiff.load("no-such-model")
    assert ".preview" not in str(e.value)


@pytest.mark.parametrize("name", ["emoji", "shapes"])
def test_shipped_preview_is_close_to_the_vae_decode(name):
    """The shipped preview decoders on latents the sampler really produces (not the training posteriors)."""
    pipe = latentdiff.load(name, dtype=torch.float32)
    assert pipe.preview_decoder is not None
    prompts = {"emoji": ["red apple", "grinning face", "red heart", "rocket"],
               "shapes": ["a red circle", "two blue squares", "a green triangle left of a yellow circle",
                          "three purple stars"]}[name]
    latents = pipe(prompts, seed=0, progress=False, output="latent")
    full = np.stack([np.asarray(i, dtype=np.float32) for i in pipe.decode(latents)])
    fast = np.stack([np.asarray(i, dtype=np.float32) for i in pipe.preview(latents)])
    assert fast.shape == full.shape
    score = 10 * np.log10(255.0**2 / ((fast - full) ** 2).mean())
    assert score >= PREVIEW_PSNR[name], score


# measured per image on these 4 prompts: emoji 18.5-23.4 dB, shapes 27.4-29.9 dB; with 4 more prompts each,
# 17.4-25.2 (20.7 over all 8) and 26.1-31.8 (28.9); on held-out posteriors 21.3 (emoji) and 29.1 dB (shapes)
PREVIEW_PSNR = {"emoji": 18.0, "shapes": 25.0}


def test_taesd_decoder_files_match_diffusers_autoencoder_tiny(tmp_path):
    """A released TAESD decoder, in both of its layouts (the original `taesd_decoder.safetensors` keys "1.weight",
    ... and diffusers' AutoencoderTiny file), decodes as diffusers' AutoencoderTiny does (seeded weights)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tiny = diffusers.AutoencoderTiny().eval()
    for p in tiny.parameters():  # a fresh init has zero biases; make every weight count
        p.data.normal_(0, 0.05)
    sd = tiny.state_dict()
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v  # decoder.layers.N.x -> N+1.x
                for k, v in sd.items() if k.startswith("decoder.")}
    assert "1.weight" in original and "3.conv.0.weight" in original and "19.weight" in original
    save_file(original, tmp_path / "taesd_decoder.safetensors")
    save_file(sd, tmp_path / "diffusion_pytorch_model.safetensors")  # encoder keys too: not read
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1)) * 4  # some beyond TAESD's clamp at 3
    with torch.inference_mode():
        want = tiny.decode(z).sample
    assert want.shape == (2, 3, 64, 48)
    pipe = tiny_pipe("tiny-sd15")
    for name in ("taesd_decoder.safetensors", "diffusion_pytorch_model.safetensors"):
        pipe.load_preview(tmp_path / name)
        with torch.inference_mode():
            got = pipe.preview_decoder(z)
        assert (got - want).abs().max() < 1e-5, name
        assert pipe.preview(z)[0].size == (48, 64)
    pipe.save(tmp_path / "model.safetensors")  # the TAESD decoder goes along (fp16, TAESD's keys); load() takes it
    again = latentdiff.load(tmp_path / "model.safetensors", dtype=torch.float32)
    with torch.inference_mode():
        assert (again.preview_decoder(z) - want).abs().max() < 5e-3 * want.abs().max()  # fp16 weights: 1.5e-3
    (tmp_path / "taesd_decoder.safetensors").rename(tmp_path / "model.preview.safetensors")  # a released file, renamed
    again = latentdiff.load(tmp_path / "model.safetensors", dtype=torch.float32)
    with torch.inference_mode():
        assert (again.preview_decoder(z) - want).abs().max() < 1e-5


def test_taesd_files_with_problems_are_named(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    good = {k: v for k, v in PreviewDecoder(PreviewConfig()).state_dict().items()}  # ours, without the metadata
    save_file(good, tmp_path / "neither.safetensors")
    with pytest.raises(CheckpointError, match="neither.safetensors: not a preview decoder .* and not a TAESD decoder"):
        pipe.load_preview(tmp_path / "neither.safetensors")
    from latentdiff.models.preview import TAESDDecoder

    sd = TAESDDecoder(latent_channels=16).state_dict()  # a TAESD3 / FLUX decoder: 16 latent channels
    save_file(sd, tmp_path / "taesd3_decoder.safetensors")
    with pytest.raises(CheckpointError, match="16 latent channels, this model's VAE has 4"):
        pipe.load_preview(tmp_path / "taesd3_decoder.safetensors")
    sd = TAESDDecoder().state_dict()
    del sd["18.conv.4.bias"]
    save_file(sd, tmp_path / "cut.safetensors")
    before = pipe.preview_decoder
    with pytest.raises(CheckpointError, match=r"cut.safetensors.*missing keys: 18\.conv\.4\.bias"):
        pipe.load_preview(tmp_path / "cut.safetensors")
    assert pipe.preview_decoder is before  # nothing half-loaded
