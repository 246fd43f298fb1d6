"""Training objectives: the diffusion loss (DDPM; eps or v target, Min-SNR-gamma, offset noise) and the VAE loss
(reconstruction + KL, optionally a PatchGAN hinge loss).

Noise, timesteps and caption dropout are drawn per sample from that sample's own generator (data.py), so a
batch of 2B and two micro-batches of B see exactly the same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import NOISE, sample_generator


def draw(keys: torch.Tensor, seed: int, latent_shape: tuple[int, int, int], T: int,
         timestep_shift: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-sample random numbers, always drawn in the same order: t (B,), drop (B,) uniform, vae_eps and noise
    (B, C, h, w), offset (B, C, 1, 1).

    t is uniform in [0, T), or with timestep_shift s != 1 drawn as T * s u / (1 + (s - 1) u), u uniform: s > 1
    trains the high-noise steps (where the layout is decided) more often, as SD3's / kohya's shifted sampling."""
    out = {"t": [], "drop": [], "vae_eps": [], "noise": [], "offset": []}
    c = latent_shape[0]
    for key in keys.tolist():
        g = sample_generator(seed, key, NOISE)
        if timestep_shift == 1.0:
            out["t"].append(torch.randint(0, T, (), generator=g))
        else:
            u = torch.rand((), generator=g, dtype=torch.float64)
            out["t"].append((T * timestep_shift * u / (1 + (timestep_shift - 1) * u)).long().clamp(max=T - 1))
        out["drop"].append(torch.rand((), generator=g))
        out["vae_eps"].append(torch.randn(latent_shape, generator=g))
        out["noise"].append(torch.randn(latent_shape, generator=g))
        out["offset"].append(torch.randn(c, 1, 1, generator=g))
    return {k: torch.stack(v) for k, v in out.items()}


def snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556): the per-sample loss weight min(SNR, gamma) / SNR for
    an eps target, min(SNR, gamma) / (SNR + 1) for a v target (v's loss already carries a factor SNR + 1)."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)  # (B,)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def unet_loss(predict, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
              prediction_type: str, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """The DDPM objective (Ho et al. 2020; v: Salimans & Ho 2022).

    predict(x_t, t) -> the model's output (the conditioned U-Net); latents, noise (B, C, h, w) fp32, scaled
    latents; t (B,) int64 in [0, T).
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; target eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
    a = alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    x_t = a**0.5 * latents + (1 - a) ** 0.5 * noise
    target = noise if prediction_type == "epsilon" else a**0.5 * noise - (1 - a) ** 0.5 * latents
    pred = predict(x_t, t.float())
    per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma:
        per_sample = per_sample * snr_weights(a.view(-1), min_snr_gamma, prediction_type)
    return per_sample.mean()


# --- VAE ------------------------------------------------------------------------------------------------------


class VAEForward(nn.Module):
    """Wraps the autoencoder so DDP sees one forward that takes the posterior noise as an input."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(x)  # q(z|x), unscaled latents (B, z, h, w)
        z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        return self.vae.decode(z), posterior.kl()  # (B, 3, H, W), (B,)


def vae_losses(x: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, KL), both summed per image and averaged over the batch, as ldm's LPIPSWithDiscriminator
    (without LPIPS), so kl_weight keeps its usual meaning (1e-6)."""
    err = (recon.float() - x).abs() if kind == "l1" else (recon.float() - x) ** 2
    return err.sum(dim=(1, 2, 3)).mean(), kl.float().mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017), 3 stride-2 layers: one real/fake logit per ~70x70 patch. GroupNorm instead
    of BatchNorm so ranks need no synchronised statistics."""

    def __init__(self, ch: int = 64, layers: int = 3):
        super().__init__()
        mods, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, layers + 1):
            c_out = ch * min(2**i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers else 1, 1), nn.GroupNorm(32, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h', w') logits


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
