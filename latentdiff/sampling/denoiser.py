"""The k-diffusion model contract on top of a U-Net: denoiser(x, sigma, ...) -> x0, in VE space x = x0 + sigma*eps.

The U-Net was trained in the variance-preserving space, x_vp = x / sqrt(sigma^2 + 1), at integer timesteps t with
sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]). Its raw output is eps or v (Salimans & Ho 2022);
classifier-free guidance (Ho & Salimans 2022) and guidance rescale (Lin et al. 2023) act on that raw output,
exactly where diffusers' pipelines apply them, and only then is it turned into x0.
"""
from __future__ import annotations

import torch

from .schedules import Schedule, sigma_to_t

PREDICTION_TYPES = ("epsilon", "v_prediction")


class Denoiser:
    """Wrap ``unet(x_in, t, context, y=None) -> eps | v`` as ``model(x, sigma, **extra_args) -> x0``."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        ac = alphas_cumprod.float().cpu().clamp(min=2**-24)
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log()  # (T,) for t off any schedule grid

    def sigma_to_t(self, sigma: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """The timestep diffusers feeds the U-Net at sigma: the schedule's own (fractional with linspace
        spacing, rounded for karras DPM-Solver, ...) where sigma is on its grid, else log-sigma interpolation."""
        if schedule is not None:
            return schedule.sigma_to_t(sigma)
        return sigma_to_t(sigma, self.log_sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0, c_concat: torch.Tensor | None = None,
                 schedule: Schedule | None = None) -> torch.Tensor:
        """x (B, C, h, w) at noise level sigma (scalar or (B,)) -> x0 (B, C, h, w).

        cond / uncond: {"context": (B, L, D), optionally "y": (B, adm), "guidance": (B,) (the guidance-scale
        embedding's w of LCM-distilled U-Nets, passed on as the unet's ``guidance=``; give no uncond then)}. With
        guidance_scale > 1 and an uncond, one batch [uncond, cond] runs (diffusers' order). c_concat (B, 5, h, w) (inpainting: mask + masked-image
        latent) is appended to the scaled input. schedule: the Schedule being sampled, so t is exactly diffusers'
        (``samplers.sample`` passes it).
        """
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(B)  # (B,)
        s = sigma.view(B, *[1] * (x.ndim - 1)).to(x.dtype)  # (B, 1, 1, 1)
        x_in = x / (s**2 + 1) ** 0.5  # c_in x, divided as diffusers' scale_model_input does (same rounding)
        if c_concat is not None:
            x_in = torch.cat([x_in, c_concat.to(x_in)], dim=1)  # (B, 4 + 5, h, w)
        t = self.sigma_to_t(sigma, schedule).to(x.device)  # (B,)
        guided = guidance_scale > 1 and uncond is not None
        if guided:
            out_u, out_c = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond["context"],
                                     cond["context"]]), _cat_y(uncond, cond)).chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
            if guidance_rescale > 0:
                out = rescale_guidance(out, out_c, guidance_rescale)
        elif "guidance" in cond:
            out = self.unet(x_in, t, cond["context"], cond.get("y"), guidance=cond["guidance"])
        else:
            out = self.unet(x_in, t, cond["context"], cond.get("y"))
        if self.prediction_type == "epsilon":
            return x - s * out
        # v: x0 = c_skip x + c_out v with sigma_data = 1 (Karras et al. 2022, table 1)
        return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, eq. 15-16: scale the guided prediction to the per-sample std of the conditional one,
    then mix by phi (diffusers' rescale_noise_cfg; unbiased std over all dims but batch)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def _cat_y(uncond: dict, cond: dict) -> torch.Tensor | None:
    if cond.get("y") is None:
        return None
    return torch.cat([uncond["y"], cond["y"]])
