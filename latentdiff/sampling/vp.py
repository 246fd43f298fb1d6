"""The DDPM-era samplers (DDIM, DDPM, PNDM) and the consistency-distilled ones (LCM, TCD), rewritten from alphas to
sigmas with alphas_cumprod = 1 / (1 + sigma^2); the contract is samplers.py's. LCM / TCD also take ``schedule=``:
their steps depend on its integer timesteps, not only on the sigmas.
"""
from __future__ import annotations

import torch
from tqdm.auto import trange

from .steps import randn, report, setup, to_d


# --- DDPM-era samplers, rewritten in sigmas (alphas_cumprod = 1 / (1 + sigma^2)) -----------------------------

def _vp_out(x, sigmas):
    """The VP latent diffusers returns: DDIM / PNDM stop at sigma_min > 0, where x_vp = x / sqrt(1 + sigma^2)."""
    return x / (1 + sigmas[-1] ** 2) ** 0.5


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12); eta=0 is Euler in VE space. = DDIMScheduler: ends at alphas_cumprod[0]
    (set_alpha_to_one False), so the result is the VP latent x / sqrt(1 + sigma_last^2)."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        eps = to_d(x, sigmas[i], denoised)
        a_t, a_p = 1 / (1 + sigmas[i] ** 2), 1 / (1 + sigmas[i + 1] ** 2)
        std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5  # sigma_t(eta) of eq. 16
        x = denoised + ((1 - a_p - std**2) / a_p) ** 0.5 * eps  # VP update divided by sqrt(a_p)
        if eta > 0:
            x = x + randn(x, generator) * std / a_p**0.5
    return _vp_out(x, sigmas)


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Ancestral DDPM posterior step q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7), variance "fixed_small"
    (clamped at 1e-20, so the last step to sigma 0 still draws). = DDPMScheduler."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        a_t, a_p = 1 / (1 + sigmas[i] ** 2), 1 / (1 + sigmas[i + 1] ** 2)
        beta = 1 - a_t / a_p
        mean_vp = a_p**0.5 * beta / (1 - a_t) * denoised + (a_t / a_p) ** 0.5 * (1 - a_p) / (1 - a_t) * a_t**0.5 * x
        var = ((1 - a_p) / (1 - a_t) * beta).clamp(min=1e-20)
        x = (mean_vp + var**0.5 * randn(x, generator)) / a_p**0.5
    return _vp_out(x, sigmas)


@torch.no_grad()
def sample_pndm(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022) with skip_prk_steps: a Heun step on eps
    first, then Adams-Bashforth of order 2, 3, 4 on eps (the VE derivative) with DDIM's transfer, which is an Euler
    step in VE. = PNDMScheduler(skip_prk_steps=True); ends at sigma_min like DDIM. For v models diffusers
    extrapolates the raw v outputs instead of eps, a different multistep method; we keep eps for both."""
    extra_args, s_in = setup(x, extra_args)
    ds = []
    ab = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if i == 0 and len(sigmas) > 2:  # diffusers' PLMS warm-up: evaluate at the Euler point and average
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            ds = [d]  # the warm-up evaluation is not kept in the history
            x = x + (d + d_2) / 2 * dt
            continue
        ds = (ds + [d])[-4:]
        x = x + sum(c * e for c, e in zip(ab[len(ds)], reversed(ds))) * dt
    return _vp_out(x, sigmas)


# --- consistency-distilled samplers (integer timesteps of the distillation grid, schedules "lcm" family) -------

def _lcm_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's boundary-condition scalings c_skip, c_out at the integer timestep t (Song et al. 2023, sec. 3.1 with
    sigma_data 0.5; Luo et al. 2023 scale t by 10 so that c_skip ~ 0 and c_out ~ 1 at every grid step, as in
    diffusers' get_scalings_for_boundary_condition_discrete, timestep_scaling 10)."""
    sigma_data, st = 0.5, t * 10.0
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2) ** 0.5


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, schedule=None):
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 3): the
    consistency function f = c_skip(t) x_vp + c_out(t) x0, then fresh noise up to the next sigma (none after the
    last step). = LCMScheduler. ``schedule`` gives the integer timesteps t the scalings need."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        x0 = model(x, sigmas[i] * s_in, **extra_args)
        c_skip, c_out = _lcm_scalings(schedule.timesteps[i].to(x.device))
        denoised = c_out * x0 + c_skip * x / (sigmas[i] ** 2 + 1) ** 0.5  # the scalings act on the VP sample
        report(callback, i, sigmas[i], x, denoised)
        x = denoised
        if i < len(sigmas) - 2:
            x = x + randn(x, generator) * sigmas[i + 1]  # VP sqrt(a') x0 + sqrt(1 - a') z, divided by sqrt(a')
    return x


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, schedule=None,
               eta=0.3):
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, "TCD", Alg. 4;
    gamma = eta): from t jump along the trajectory to s = floor((1 - eta) t_prev) with the predicted x0 and eps,
    then noise forward from s to t_prev (not on the last step, whose s is 0). eta 0 is deterministic (DDIM on the
    LCM grid). = TCDScheduler.step(eta=0.3); it ends at alphas_cumprod[0], as DDIM does (sigmas[-1])."""
    extra_args, s_in = setup(x, extra_args)
    N = len(sigmas) - 1
    train_sigmas = schedule.log_sigmas.double().exp()  # (T,) to look up sigma at s, off the grid
    for i in trange(N, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        eps = to_d(x, sigmas[i], denoised)
        t_prev = schedule.timesteps[i + 1].long() if i + 1 < N else torch.tensor(0)
        s = int(torch.floor((1 - eta) * t_prev))  # float32 product, as diffusers rounds it
        sigma_s = train_sigmas[s].to(x)
        x = denoised + sigma_s * eps
        if eta > 0 and i + 1 < N:
            x = x + randn(x, generator) * (sigmas[i + 1] ** 2 - sigma_s**2).clamp(min=0) ** 0.5
    return _vp_out(x, sigmas)
