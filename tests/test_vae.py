"""KL autoencoder: released key layout, parity with diffusers.AutoencoderKL, and the diffusers key converter."""
import json
from pathlib import Path

import pytest
import torch

from latentdiff.config import SD15, SDXL, TINY_SD15
from latentdiff.weights.diffusers.vae import diffusers_config, from_diffusers, to_diffusers
from latentdiff.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

LAYOUTS = Path(__file__).resolve().parent / "layouts"  # copies of shared/reference/checkpoint-layouts
CFG = TINY_SD15.vae  # ch 32, ch_mult (1, 1, 2, 2), one res block: f = 8


def _released_vae_shapes(name: str) -> dict[str, list[int]]:
    layout = json.loads((LAYOUTS / f"{name}.json").read_text())
    prefix = "first_stage_model."
    return {k[len(prefix):]: shape for k, (shape, _dtype) in layout.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name, cfg", [("sd15", SD15.vae), ("sdxl", SDXL.vae)])
def test_full_size_keys_and_shapes_equal_released_layout(name, cfg):
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    released = _released_vae_shapes(name)
    assert len(released) == 248
    assert sorted(set(ours) ^ set(released)) == []
    assert {k: v for k, v in ours.items() if released[k] != v} == {}


def test_full_size_conversion_matches_diffusers_keys_and_shapes():
    with torch.device("meta"):
        ours = AutoencoderKL(SD15.vae).state_dict()
        theirs = diffusers.AutoencoderKL(**diffusers_config(SD15.vae)).state_dict()
    converted = {k: list(v.shape) for k, v in to_diffusers(ours, SD15.vae).items()}
    assert converted == {k: list(v.shape) for k, v in theirs.items()}


@pytest.fixture(scope="module")
def pair():
    """Our tiny VAE with seeded, perturbed weights and diffusers' twin loaded strictly through to_diffusers."""
    torch.manual_seed(0)
    ours = AutoencoderKL(CFG).eval()
    with torch.no_grad():
        # perturb everything, so GroupNorm scales/shifts and biases are not 1/0 and a wrong mapping shows
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = diffusers.AutoencoderKL(**diffusers_config(CFG, sample_size=64)).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), CFG), strict=True)
    return ours, theirs


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_matches_diffusers(pair, image):
    ours, theirs = pair
    with torch.no_grad():
        post = ours.encode(image)
        ref = theirs.encode(image).latent_dist
    assert post.mean.shape == (2, 4, 8, 8)
    assert (post.mean - ref.mean).abs().max() <= 1e-4
    assert (post.logvar - ref.logvar).abs().max() <= 1e-4
    assert (post.std - ref.std).abs().max() <= 1e-4
    assert (post.kl() - ref.kl()).abs().max() <= 1e-4 * ref.kl().abs().max()
    assert torch.equal(post.mode(), post.mean)


def test_decode_matches_diffusers(pair):
    ours, theirs = pair
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours.decode(z)
        ref = theirs.decode(z).sample
    assert out.shape == (2, 3, 64, 64)
    assert ref.abs().max() > 0.1  # a meaningful signal, not a near-zero output
    assert (out - ref).abs().max() <= 1e-4


def test_posterior_sample_matches_diffusers_with_same_seed(pair, image):
    ours, theirs = pair
    with torch.no_grad():
        post = ours.encode(image)
        ref = theirs.encode(image).latent_dist
    sample = post.sample(torch.Generator().manual_seed(3))
    ref_sample = ref.sample(torch.Generator().manual_seed(3))
    assert (sample - ref_sample).abs().max() <= 1e-4
    assert (sample - post.mean).abs().max() > 1e-3  # noise was actually added
    assert not torch.allclose(sample, post.sample(torch.Generator().manual_seed(4)))


def test_forward_returns_reconstruction_and_posterior(pair, image):
    ours, _ = pair
    with torch.no_grad():
        rec, post = ours(image, generator=torch.Generator().manual_seed(3))
        expected = ours.decode(post.sample(torch.Generator().manual_seed(3)))
    assert rec.shape == image.shape
    assert torch.equal(rec, expected)


def test_logvar_is_clamped():
    from latentdiff.models.vae import DiagonalGaussian

    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    assert DiagonalGaussian(moments).logvar.max() == 20.0
    assert DiagonalGaussian(-moments).logvar.min() == -30.0


def test_conversion_round_trip_is_exact(pair):
    ours, theirs = pair
    sd = ours.state_dict()
    there = to_diffusers(sd, CFG)
    back = from_diffusers(there, CFG)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) and back[k].shape == sd[k].shape for k in sd)
    # and the other way round, starting from diffusers' own state dict
    dsd = theirs.state_dict()
    assert all(torch.equal(v, dsd[k]) for k, v in to_diffusers(from_diffusers(dsd, CFG), CFG).items())
    # the reversed up-index: our full-resolution level 0 is diffusers' last up block
    assert torch.equal(there["decoder.up_blocks.3.resnets.0.conv1.weight"], sd["decoder.up.0.block.0.conv1.weight"])
    assert there["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)


def test_unknown_keys_raise_naming_the_key():
    w = torch.zeros(1)
    with pytest.raises(ValueError, match=r"encoder\.bogus\.weight"):
        to_diffusers({"encoder.conv_in.weight": w, "encoder.bogus.weight": w}, CFG)
    # a shortcut that this config's equal-width block does not have
    with pytest.raises(ValueError, match=r"encoder\.down\.0\.block\.0\.nin_shortcut\.weight"):
        to_diffusers({"encoder.down.0.block.0.nin_shortcut.weight": w}, CFG)
    # an ldm key handed to the diffusers -> ldm direction
    with pytest.raises(ValueError, match=r"from_diffusers: unknown VAE key 'decoder\.up\.0\.block\.0\.conv1\.bias'"):
        from_diffusers({"decoder.up.0.block.0.conv1.bias": w}, CFG)
