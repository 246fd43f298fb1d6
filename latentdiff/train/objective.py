"""What a run trains and its loss: `Trainee`, the one seam train() runs through, and the full U-Net fine-tune
on the diffusion loss (DDPM; eps or v target, Min-SNR-gamma, offset noise). The VAE trainer is in vae.py.

Noise, timesteps and caption dropout are drawn per sample from that sample's own generator (data.py), so a
batch of 2B and two micro-batches of B see exactly the same numbers.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff import weights
from latentdiff.config import ModelConfig
from latentdiff.models.text import Tokenizer
from latentdiff.models.unet import sdxl_vector
from latentdiff.sampling import schedules

from . import cache as cache_mod
from . import data
from .config import TrainConfig
from .data import NOISE, sample_generator
from .model import UNetWithText, enable_gradient_checkpointing, encode_ids, forward_flops, size_cond, tokenize
from .validate import sample_grid


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
              prediction_type: str, min_snr_gamma: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
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
    if weights is not None:  # (B,), e.g. DreamBooth's prior_loss_weight on class images
        per_sample = per_sample * weights
    return per_sample.mean()


def adamw(tc: TrainConfig, params, **kw) -> torch.optim.Optimizer:
    """AdamW; with optimizer adamw8bit bitsandbytes' AdamW8bit (Dettmers et al. 2021: 8-bit moments, a quarter of
    the optimizer memory) where bitsandbytes is installed, else AdamW with a warning."""
    opts = dict(betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay, **kw)
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            logging.getLogger("latentdiff.train").warning("optimizer adamw8bit: bitsandbytes is not installed; "
                                                          "using torch.optim.AdamW")
        else:
            return bitsandbytes.optim.AdamW8bit(params, **opts)
    return torch.optim.AdamW(params, **opts)


class Trainee:
    """What a run trains and its loss: the one seam between train() and a kind of training. The full U-Net
    fine-tune (below) and the VAE (vae.py) are two; LoRA (lora.py) and textual inversion (embedding.py) two more.

    Built from the config, the models (fp32, on the CPU) and the Accelerator, it marks what trains, puts on the
    device what the loss runs on, and holds
      modules  the trained modules by checkpoint key (the checkpoint's "model" has one state dict per key)
      params   {name: parameter} the optimizer, gradient clipping, the EMA and the sync check see
      model    the one module accelerate wraps (DDP / FSDP); after prepare(), `wrapped` lists what it wrapped
    train() calls, in this order: param_groups, load_state_dict (on resume), flops_per_sample, prepare, then per
    micro-batch loss and after_step, and state_dict / preview / export when it saves, validates, ends.
    """

    prefixes: dict[str, str]  # checkpoint key -> where that module's weights sit in model's state dict
    export_name = "final.safetensors"  # the file export() writes, in the run folder

    def __init__(self, tc: TrainConfig, cfg: ModelConfig, parts: dict[str, nn.Module], acc,
                 trained: dict[str, nn.Module], placed: tuple[str, ...]):
        self.tc, self.cfg, self.parts, self.acc, self.device = tc, cfg, parts, acc, acc.device
        self.modules = trained
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.mixed_precision, torch.float32)
        for name, m in parts.items():
            m.requires_grad_(name in trained).train(name in trained)
            if name in placed:
                m.to(self.device, torch.float32 if name in trained else self.weight_dtype)  # frozen: mixed dtype
        self.freeze()
        self.params = {f"{k}.{n}": p for k, m in trained.items() for n, p in m.named_parameters() if p.requires_grad}

    def freeze(self) -> None:
        """Untrain what the config keeps frozen inside a trained module."""

    def train_mode(self) -> None:
        """The trained modules back to training (the Pipeline of a preview froze them)."""
        for m in self.modules.values():
            m.requires_grad_(True).train()
        self.freeze()

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups, each with its base "lr" (the schedule scales it)."""
        return [{"params": list(self.params.values()), "lr": self.tc.lr}]

    def flops_per_sample(self) -> int:
        """FLOPs of one training sample, forward + backward (3 forwards), for model FLOP utilisation."""
        raise NotImplementedError

    def prepare(self, optimizer):
        """Compile and wrap `model` for accelerate; returns the wrapped optimizer."""
        if self.tc.compile:
            self.model = torch.compile(self.model)
        self.model, optimizer = self.acc.prepare(self.model, optimizer)
        self.wrapped = [self.model]
        return optimizer

    def loss(self, batch: dict, step: int) -> torch.Tensor:
        """The scalar train() backpropagates and logs, for one micro-batch, at optimizer step `step`."""
        raise NotImplementedError

    def after_step(self, lr_factor: float) -> None:
        """After the optimizer's step on every micro-batch (accelerate's optimizers skip all but the last of an
        accumulation): what trains beside `params` steps here (the VAE's discriminator)."""

    def state_dict(self) -> dict:
        """The checkpoint's entries of the trainee: "model" and any of its own. Every rank calls it (FSDP / ZeRO
        gather the full weights); only the main process's result is saved."""
        full = self.acc.get_state_dict(self.model)
        full = {n.removeprefix("_orig_mod."): v for n, v in full.items()}  # torch.compile's wrapper
        return {"model": {k: {n[len(p):]: v for n, v in full.items() if n.startswith(p)}
                          for k, p in self.prefixes.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a checkpoint (its state_dict entries), into the unwrapped modules, before prepare."""
        for k, m in self.modules.items():
            m.load_state_dict(state["model"][k])

    def preview(self, out: Path) -> None:
        """Write the validation image of the current weights to `out`; leave the modules training."""
        raise NotImplementedError

    def export(self, path: Path, metadata: dict[str, str]) -> None:
        """The trained model as one single file that latentdiff.load opens (train() swaps the EMA weights in)."""
        weights.save_single_file(path, self.cfg, self.parts, extra_metadata=metadata)


class UNetTrainer(Trainee):
    """Full fine-tune of the U-Net (with train_text_encoder, the text encoders too) on the diffusion loss."""

    def __init__(self, tc: TrainConfig, cfg: ModelConfig, parts: dict[str, nn.Module], acc,
                 dataset: data.ImageDataset, bucket_of: list[int] | None, trained: dict[str, nn.Module] | None = None):
        """trained: what trains instead of the U-Net (and text encoders), e.g. a LoRA on the frozen model."""
        self.unet, self.vae, self.encoders = parts["unet"], parts["vae"], parts["text_encoders"]
        te = {"text_encoders": self.encoders} if tc.train_text_encoder else {}
        super().__init__(tc, cfg, parts, acc, {"unet": self.unet, **te} if trained is None else trained,
                         placed=tuple(parts))
        self.prefixes = {"unet": "unet.", "text_encoders": "text_encoders."} if te else {"unet": ""}
        if tc.gradient_checkpointing:
            enable_gradient_checkpointing(self.unet)
        self.model = UNetWithText(self.unet, self.encoders) if tc.text_trains else self.unet
        self.dataset, self.bucket_of, self.cache, self.tokenizer = dataset, bucket_of, None, Tokenizer()
        self.alphas_cumprod = schedules.model_alphas_cumprod(cfg)

    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for n, p in self.params.items() if not n.startswith("text_encoders.")],
                   "lr": self.tc.lr}]
        if self.tc.train_text_encoder:
            groups.append({"params": list(self.encoders.parameters()), "lr": self.tc.text_encoder_lr or self.tc.lr})
        return groups

    def flops_per_sample(self) -> int:
        u, d, h = self.cfg.unet, self.device, self.tc.resolution // self.cfg.vae.downsample
        ctx1 = torch.zeros(1, 77, u.context_dim, device=d)
        y1 = torch.zeros(1, u.adm_in_channels, device=d) if u.adm_in_channels else None
        z1 = torch.zeros(1, u.in_channels, h, h, device=d)
        return 3 * forward_flops(lambda: self.unet(z1, torch.zeros(1, device=d), ctx1, y1))

    def prepare(self, optimizer):
        optimizer = super().prepare(optimizer)
        if self.tc.cache_dir:  # posteriors (and text) computed once; the loader then skips decoding images
            self.cache = cache_mod.build(self.tc, self.cfg, self.acc, self.dataset, self.bucket_of, self.vae,
                                         self.encoders, self.tokenizer, self.weight_dtype)
            self.dataset.load_pixels = False
        return optimizer

    def loss(self, batch: dict, step: int) -> torch.Tensor:
        tc, cfg, device, cache, model = self.tc, self.cfg, self.device, self.cache, self.model
        hw, f = batch["hw"][0], cfg.vae.downsample
        latent_shape = (cfg.vae.z_channels, hw[0] // f, hw[1] // f)
        r = draw(batch["key"], tc.seed, latent_shape, cfg.num_train_timesteps, tc.timestep_shift)
        r = {k: v.to(device) for k, v in r.items()}
        drop = (r["drop"] < tc.caption_dropout).tolist()  # caption dropout: train on the empty prompt
        # DreamBooth: the class images (dreambooth.py) are the last class_images records and keep their caption
        prior = batch["index"] >= len(self.dataset) - tc.class_images if tc.class_prompt else torch.zeros(
            len(drop), dtype=torch.bool)
        captions = ["" if d else c if p else tc.instance_prompt or c
                    for c, d, p in zip(batch["caption"], drop, prior.tolist())]
        weights = torch.where(prior, tc.prior_loss_weight, 1.0).to(device) if tc.class_prompt else None
        with torch.no_grad():
            if cache is not None:
                mean, std = cache.posterior(batch["index"].tolist(), device)
            else:
                posterior = self.vae.encode(batch["pixels"].to(device, self.weight_dtype))
                mean, std = posterior.mean.float(), posterior.std.float()
            latents = (mean + std * r["vae_eps"]) * cfg.vae.scaling_factor  # (B, 4, h, w)
        size = size_cond(batch["orig_size"], batch["crop"], hw, device) if cfg.unet.adm_in_channels else None
        if tc.text_trains:  # with grad, through the wrapped model
            ids = self.text_input(captions)
            predict = lambda x, t: model(x, t, ids, size)  # noqa: E731
        else:
            with torch.no_grad():
                if cache is not None:
                    context, pooled = cache.text(batch["index"].tolist(), drop, device)
                else:
                    context, pooled = encode_ids(self.encoders, tokenize(self.tokenizer, self.encoders, captions,
                                                                         device))
            y = sdxl_vector(pooled.float(), size, cfg.unet.adm_in_channels) if size is not None else None
            predict = (lambda x, t: model(x, t, context, y)) if y is not None else (lambda x, t: model(x, t, context))
        noise = r["noise"] + tc.offset_noise * r["offset"]  # offset noise (Guttenberg 2023)
        with self.acc.autocast():
            return unet_loss(predict, latents, noise, r["t"], self.alphas_cumprod, cfg.prediction_type,
                             tc.min_snr_gamma, weights)

    def text_input(self, captions: list[str]):
        """What the wrapped model's forward encodes with grad when the text side trains: token ids."""
        return tokenize(self.tokenizer, self.encoders, captions, self.device)

    def preview(self, out: Path) -> None:
        sample_grid(self.tc, self.cfg, self.parts, self.device, out)
        self.train_mode()
