"""Training the autoencoder: reconstruction + KL, optionally a PatchGAN hinge loss, an optionally frozen
encoder, reconstruction grids as previews, and the latent scale measured for the export."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff import weights
from latentdiff.config import ModelConfig

from . import data
from .config import TrainConfig
from .model import forward_flops
from .objective import Trainee, adamw, draw

log = logging.getLogger("latentdiff.train")


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


class VAETrainer(Trainee):
    """The autoencoder alone (the U-Net and text encoders stay on the CPU, untouched); with vae_disc_weight a
    PatchGAN discriminator trains beside it on its own optimizer, saved as the checkpoint's "disc" and
    "disc_optimizer"."""

    prefixes = {"vae": "vae."}

    def __init__(self, tc: TrainConfig, cfg: ModelConfig, parts: dict[str, nn.Module], acc,
                 dataset: data.ImageDataset):
        self.vae = parts["vae"]
        super().__init__(tc, cfg, parts, acc, {"vae": self.vae}, placed=("vae",))
        self.model = VAEForward(self.vae)
        self.records, self.crop = dataset.records, dataset.buckets[0]  # previews and the latent scale
        self.disc = self.disc_opt = self.pair = None
        if tc.vae_disc_weight:
            self.disc = PatchDiscriminator().to(self.device)
            self.disc_opt = adamw(tc, self.disc.parameters(), lr=tc.lr)

    def freeze(self) -> None:
        if self.tc.vae_decoder_only:  # the latents, and any U-Net trained on them, stay valid
            self.vae.encoder.requires_grad_(False).eval()
            self.vae.quant_conv.requires_grad_(False)

    def flops_per_sample(self) -> int:
        x1 = torch.zeros(1, 3, self.tc.resolution, self.tc.resolution, device=self.device)
        return 3 * forward_flops(lambda: self.vae.decode(self.vae.encode(x1).mean))

    def prepare(self, optimizer):
        optimizer = super().prepare(optimizer)
        if self.disc is not None:
            self.disc, self.disc_opt = self.acc.prepare(self.disc, self.disc_opt)
            self.wrapped.append(self.disc)
        return optimizer

    def loss(self, batch: dict, step: int) -> torch.Tensor:
        """The autoencoder's: reconstruction + kl_weight KL, from vae_disc_start minus the discriminator's score
        of the reconstructions (the generator's hinge term)."""
        tc, acc, disc = self.tc, self.acc, self.disc
        x = batch["pixels"].to(self.device)  # (B, 3, H, W)
        hw, f = batch["hw"][0], self.cfg.vae.downsample
        r = draw(batch["key"], tc.seed, (self.cfg.vae.z_channels, hw[0] // f, hw[1] // f), self.cfg.num_train_timesteps)
        with acc.autocast():
            recon, kl = self.model(x, r["vae_eps"].to(self.device))
            rec, kl = vae_losses(x, recon, kl, tc.vae_recon)
            loss = rec + tc.vae_kl_weight * kl
            if disc is not None and step >= tc.vae_disc_start:
                raw = acc.unwrap_model(disc).requires_grad_(False)  # no gradient into the discriminator here
                loss = loss - tc.vae_disc_weight * raw(recon).float().mean()
                raw.requires_grad_(True)
        if disc is not None:
            self.pair = torch.cat([x, recon.detach()])  # (2B, 3, H, W) for after_step: reals, then fakes
        return loss

    def after_step(self, lr_factor: float) -> None:
        """The discriminator's update on this micro-batch's images and reconstructions, with the autoencoder's
        learning rate schedule."""
        if self.disc is None:
            return
        for g in self.disc_opt.param_groups:
            g["lr"] = self.tc.lr * lr_factor
        # no zero_grad before backward: under grad_accum the prepared optimizer steps (and zeroes) only on the
        # last micro-batch, so its gradients must sum over all of them, as the autoencoder's do
        with self.acc.autocast():
            logits = self.disc(self.pair).float()
            d_loss = hinge_d_loss(*logits.chunk(2))
        self.acc.backward(d_loss)
        self.pair = None
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.disc is not None:
            state["disc"] = self.acc.unwrap_model(self.disc).state_dict()
            state["disc_optimizer"] = self.disc_opt.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_optimizer"])

    def plain_tensor(self, r: data.Record) -> torch.Tensor:
        """A record as (3, H, W) in [-1, 1], center-cropped, not flipped."""
        image = r.source if not isinstance(r.source, str) else data.Image.open(r.source)
        return data.to_tensor(image, self.crop, False, False, torch.Generator())[0]

    def preview(self, out: Path) -> None:
        """The first 8 images over their reconstructions (posterior means)."""
        x = torch.stack([self.plain_tensor(r) for r in self.records[:8]])  # (8, 3, H, W)
        with torch.no_grad():
            recon = self.vae.decode(self.vae.encode(x.to(self.device)).mean).float().cpu()
        grid = torch.cat([torch.cat(list(x), -1), torch.cat(list(recon), -1)], -2)  # (3, 2H, 8W)
        arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        data.Image.fromarray(arr).save(out)

    @torch.no_grad()
    def latent_scale(self, n: int = 2048) -> float:
        """1 / std of posterior samples of up to n training images: the rule behind SD's 0.18215, so the
        U-Net sees unit-variance latents."""
        lat = []
        for i in range(0, min(n, len(self.records)), 64):
            x = torch.stack([self.plain_tensor(r) for r in self.records[i:i + 64]])
            g = torch.Generator(self.device).manual_seed(i)
            lat.append(self.vae.encode(x.to(self.device)).sample(g).float().cpu())
        return 1.0 / torch.cat(lat).std().item()

    def export(self, path: Path, metadata: dict[str, str]) -> None:
        """With the latent scale measured on the training images, unless the encoder was frozen (it keeps its
        latents, hence their scale)."""
        cfg = self.cfg
        if not self.tc.vae_decoder_only:
            cfg = replace(cfg, vae=replace(cfg.vae, scaling_factor=self.latent_scale()))
            log.info("VAE scaling_factor = %.5f (1 / std of the training latents)", cfg.vae.scaling_factor)
        weights.save_single_file(path, cfg, self.parts, extra_metadata=metadata)
