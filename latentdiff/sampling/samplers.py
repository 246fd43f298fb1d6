"""Every sampler, k-diffusion's contract: ``sample_<name>(model, x, sigmas, extra_args, callback, generator, disable)``.

model(x, sigma, **extra_args) -> x0 in VE space (x = x0 + sigma * eps); x arrives already scaled by the initial
noise level; sigmas (N+1,) descending, from ``get_sigmas`` (it ends in 0, or in sigma_min for DDIM /
PNDM). Per-step noise is ``torch.randn`` from ``generator`` in the order and shape diffusers' scheduler draws it,
so a CPU generator seeded like diffusers' pipeline gives the same latents. callback({"i", "sigma", "x",
"denoised"}) runs once per step. The diffusers scheduler each one reproduces is named in its docstring;
DDIM / DDPM / PNDM / UniPC / DPM-Solver are rewritten from alphas to sigmas with alphas_cumprod = 1/(1+sigma^2).

``SAMPLERS`` at the end is the one sampler table (function, schedule family, A1111 label): a new sampler is its
function plus one row there. LCM / TCD (family "lcm") also take ``schedule=``, the Schedule being sampled: their
steps depend on its integer timesteps, not only on the sigmas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import trange

from .denoiser import Denoiser
# samplers -> schedules at import time; schedules reads SAMPLERS only inside get_sigmas (the other direction would
# loop through denoiser.py, which needs schedules first)
from . import schedules
from .schedules import Schedule


def _randn(x, generator):
    # diffusers' randn_tensor: drawn on the generator's device (CPU for reproducible seeds), then moved
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE in VE space (= eps)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Split sigma_from -> sigma_to into a deterministic step to sigma_down plus fresh noise of std sigma_up."""
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _setup(x, extra_args):
    return extra_args or {}, x.new_ones([x.shape[0]])  # s_in (B,): sigma per batch element


def _report(callback, i, sigma, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


# --- k-diffusion samplers (Karras et al. 2022 and successors) -----------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn). = EulerDiscrete."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_a(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Ancestral Euler (k-diffusion; the DDPM ancestral step of Ho et al. 2020 in sigma form).
    = EulerAncestralDiscrete, which draws noise at every step, the last one included."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        x = x + _randn(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); Euler for the last step to 0. = HeunDiscrete."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm2(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """DPM-Solver-2 midpoint in log sigma (Lu et al. 2022, as in k-diffusion / Karras et al. 2022 "DPM2").
    = KDPM2Discrete (its midpoint computed with the same float32 lerp, so the timestep matches too)."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        d = _to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_mid = sigmas[i + 1].log().lerp(sigmas[i].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm2_a(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Ancestral DPM-Solver-2 (k-diffusion). = KDPM2AncestralDiscrete: noise after each 2nd-order step, none on
    the final Euler step to 0. Its midpoint is the next grid sigma (up to rounding), so the Denoiser gives it that
    grid timestep; diffusers' karras variant feeds the unrounded one there (< 0.5 timestep apart)."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigma_down - sigmas[i])
        x = x + _randn(x, generator) * sigma_up
    return x


def _lms_coeff(order, sigmas, i, j):
    """Integral over [sigma_i, sigma_i+1] of the j-th Lagrange basis polynomial through the last `order` sigmas
    (exact: Gauss-Legendre with `order` nodes integrates degree < 2*order)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * (weights * basis).sum())


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Linear multistep (Adams-Bashforth on the sigma grid), order 4 (Karras et al. 2022 / k-diffusion).
    = LMSDiscrete."""
    extra_args, s_in = _setup(x, extra_args)
    order = 4
    sigmas_np = sigmas.double().cpu().numpy()
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        ds = (ds + [_to_d(x, sigmas[i], denoised)])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coeff(cur, sigmas_np, i, j) * d for j, d in enumerate(reversed(ds)))
    return x


# --- DPM-Solver++ family (Lu et al. 2022, "DPM-Solver++"), in log-SNR time lambda = -log sigma ------------------

@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """DPM-Solver++(2M), multistep 2nd order; 1st order on the first step and on the last step to 0.
    = DPMSolverMultistep(algorithm_type="dpmsolver++", solver_order=2) with its lower_order_final."""
    extra_args, s_in = _setup(x, extra_args)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        h = sigmas[i].log() - sigmas[i + 1].log()
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = h_last / h
            denoised_d = denoised + (denoised - old_denoised) / (2 * r)
        else:
            denoised_d = denoised
        x = sigmas[i + 1] / sigmas[i] * x - torch.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """SDE-DPM-Solver++(2M), midpoint variant, eta 1 (Lu et al. 2022, sec. 5 / k-diffusion).
    = DPMSolverMultistep(algorithm_type="sde-dpmsolver++"): one noise draw per step, the last one included."""
    extra_args, s_in = _setup(x, extra_args)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        noise = _randn(x, generator)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()
        c = -torch.expm1(-2 * h)  # 1 - e^{-2h}
        x = sigmas[i + 1] / sigmas[i] * torch.exp(-h) * x + c * denoised
        if old_denoised is not None:
            x = x + 0.5 * c * (h / h_last) * (denoised - old_denoised)
        x = x + noise * sigmas[i + 1] * c.sqrt()
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2s_a(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, eta=1.0):
    """Ancestral DPM-Solver++(2S): single-step 2nd order to sigma_down with the midpoint halfway in log sigma,
    then noise sigma_up (k-diffusion / A1111 "DPM++ 2S a"). No diffusers scheduler is ancestral; with eta=0 this
    is DPMSolverSinglestep(dpmsolver++, order 2) on a grid whose odd points are the log-midpoints (tested)."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigma_down.log()
            sigma_mid = (sigmas[i].log() - h / 2).exp()
            x_2 = sigma_mid / sigmas[i] * x - torch.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = sigma_down / sigmas[i] * x - torch.expm1(-h) * denoised_2
        if eta > 0 and sigmas[i + 1] > 0:
            x = x + _randn(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, eta=1.0):
    """DPM-Solver++ SDE, 2 stages with the midpoint halfway in log sigma (k-diffusion's sample_dpmpp_sde, r=1/2).

    diffusers' DPMSolverSDE runs the same steps but takes its noise from a torchsde Brownian tree (noise at the
    midpoint and at the step end are correlated increments of one Brownian path), which a torch.Generator cannot
    reproduce; here both are independent draws from ``generator`` (midpoint first). Same marginals, not the same
    numbers; the tests check the deterministic limit (eta=0) and the sampled distribution instead.
    """
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        sigma_mid = (-(t + (t_next - t) / 2)).exp()
        sd, su = _ancestral_step(sigmas[i], sigma_mid, eta)
        x_2 = sd / sigmas[i] * x - torch.expm1(t + sd.log()) * denoised
        if eta > 0:
            x_2 = x_2 + _randn(x, generator) * su
        denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
        sd, su = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = sd / sigmas[i] * x - torch.expm1(t + sd.log()) * denoised_2
        if eta > 0:
            x = x + _randn(x, generator) * su
    return x


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """UniPC, B(h) = e^h - 1 ("bh2"), order 2, data prediction (Zhao et al. 2023): a multistep predictor, and a
    corrector that reuses the model output at the predicted point. = UniPCMultistep with its lower_order_final."""
    extra_args, s_in = _setup(x, extra_args)
    N = len(sigmas) - 1
    lam = -sigmas.log()  # (N+1,) log-SNR; +inf at sigma 0
    ms, x_last, order_last = [], None, 0  # ms: x0 predictions, newest last
    for i in trange(N, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        if x_last is not None:  # UniC: correct x with the new model output
            h = lam[i] - lam[i - 1]
            hphi = torch.expm1(-h)  # h * phi_1(-h) = B(h)
            corr = 0.0
            if order_last == 1:
                rho_t = 0.5
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                b1 = (hphi / -h - 1) / hphi
                b2 = ((hphi / -h - 1) / -h - 0.5) * 2 / hphi
                rho_1 = (b1 - b2) / (1 - rk)  # solves [[1, 1], [rk, 1]] rho = [b1, b2]
                rho_t = b1 - rho_1
                corr = rho_1 * (ms[-2] - ms[-1]) / rk
            x = sigmas[i] / sigmas[i - 1] * x_last - hphi * ms[-1] - hphi * (corr + rho_t * (denoised - ms[-1]))
        ms = (ms + [denoised])[-2:]
        order = min(2, N - i, i + 1)
        x_last, order_last = x, order
        h = lam[i + 1] - lam[i]  # UniP: predict the next point
        hphi = torch.expm1(-h)
        x = sigmas[i + 1] / sigmas[i] * x - hphi * denoised
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / h
            x = x - hphi * 0.5 * (ms[-2] - ms[-1]) / rk
    return x


# --- DDPM-era samplers, rewritten in sigmas (alphas_cumprod = 1 / (1 + sigma^2)) -----------------------------

def _vp_out(x, sigmas):
    """The VP latent diffusers returns: DDIM / PNDM stop at sigma_min > 0, where x_vp = x / sqrt(1 + sigma^2)."""
    return x / (1 + sigmas[-1] ** 2) ** 0.5


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12); eta=0 is Euler in VE space. = DDIMScheduler: ends at alphas_cumprod[0]
    (set_alpha_to_one False), so the result is the VP latent x / sqrt(1 + sigma_last^2)."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        eps = _to_d(x, sigmas[i], denoised)
        a_t, a_p = 1 / (1 + sigmas[i] ** 2), 1 / (1 + sigmas[i + 1] ** 2)
        std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5  # sigma_t(eta) of eq. 16
        x = denoised + ((1 - a_p - std**2) / a_p) ** 0.5 * eps  # VP update divided by sqrt(a_p)
        if eta > 0:
            x = x + _randn(x, generator) * std / a_p**0.5
    return _vp_out(x, sigmas)


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Ancestral DDPM posterior step q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7), variance "fixed_small"
    (clamped at 1e-20, so the last step to sigma 0 still draws). = DDPMScheduler."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        a_t, a_p = 1 / (1 + sigmas[i] ** 2), 1 / (1 + sigmas[i + 1] ** 2)
        beta = 1 - a_t / a_p
        mean_vp = a_p**0.5 * beta / (1 - a_t) * denoised + (a_t / a_p) ** 0.5 * (1 - a_p) / (1 - a_t) * a_t**0.5 * x
        var = ((1 - a_p) / (1 - a_t) * beta).clamp(min=1e-20)
        x = (mean_vp + var**0.5 * _randn(x, generator)) / a_p**0.5
    return _vp_out(x, sigmas)


@torch.no_grad()
def sample_pndm(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022) with skip_prk_steps: a Heun step on eps
    first, then Adams-Bashforth of order 2, 3, 4 on eps (the VE derivative) with DDIM's transfer, which is an Euler
    step in VE. = PNDMScheduler(skip_prk_steps=True); ends at sigma_min like DDIM. For v models diffusers
    extrapolates the raw v outputs instead of eps, a different multistep method; we keep eps for both."""
    extra_args, s_in = _setup(x, extra_args)
    ds = []
    ab = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if i == 0 and len(sigmas) > 2:  # diffusers' PLMS warm-up: evaluate at the Euler point and average
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
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
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        x0 = model(x, sigmas[i] * s_in, **extra_args)
        c_skip, c_out = _lcm_scalings(schedule.timesteps[i].to(x.device))
        denoised = c_out * x0 + c_skip * x / (sigmas[i] ** 2 + 1) ** 0.5  # the scalings act on the VP sample
        _report(callback, i, sigmas[i], x, denoised)
        x = denoised
        if i < len(sigmas) - 2:
            x = x + _randn(x, generator) * sigmas[i + 1]  # VP sqrt(a') x0 + sqrt(1 - a') z, divided by sqrt(a')
    return x


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, schedule=None,
               eta=0.3):
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, "TCD", Alg. 4;
    gamma = eta): from t jump along the trajectory to s = floor((1 - eta) t_prev) with the predicted x0 and eps,
    then noise forward from s to t_prev (not on the last step, whose s is 0). eta 0 is deterministic (DDIM on the
    LCM grid). = TCDScheduler.step(eta=0.3); it ends at alphas_cumprod[0], as DDIM does (sigmas[-1])."""
    extra_args, s_in = _setup(x, extra_args)
    N = len(sigmas) - 1
    train_sigmas = schedule.log_sigmas.double().exp()  # (T,) to look up sigma at s, off the grid
    for i in trange(N, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas[i], x, denoised)
        eps = _to_d(x, sigmas[i], denoised)
        t_prev = schedule.timesteps[i + 1].long() if i + 1 < N else torch.tensor(0)
        s = int(torch.floor((1 - eta) * t_prev))  # float32 product, as diffusers rounds it
        sigma_s = train_sigmas[s].to(x)
        x = denoised + sigma_s * eps
        if eta > 0 and i + 1 < N:
            x = x + _randn(x, generator) * (sigmas[i + 1] ** 2 - sigma_s**2).clamp(min=0) ** 0.5
    return _vp_out(x, sigmas)


@dataclass(frozen=True)
class Sampler:
    """One row of the sampler table."""

    fn: Callable  # sample_<name>(model, x, sigmas, extra_args, callback, generator, disable), the contract above
    family: str  # how diffusers builds its timesteps: "sigma" | "dpm" | "vp" | "lcm" (schedules.py, get_sigmas)
    a1111: str  # A1111's label in its PNGs' "Sampler:" field (images.parse_parameters; ours write the name)
    round_karras_t: bool = False  # its diffusers scheduler rounds karras timesteps (schedules.family_sigmas)
    last_to_zero: bool = False  # a "vp" / "lcm" sampler whose last step goes to alpha = 1


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(sample_euler, "sigma", "Euler"),
    "euler_a": Sampler(sample_euler_a, "sigma", "Euler a"),
    "heun": Sampler(sample_heun, "sigma", "Heun"),
    "dpm2": Sampler(sample_dpm2, "sigma", "DPM2", round_karras_t=True),
    "dpm2_a": Sampler(sample_dpm2_a, "sigma", "DPM2 a", round_karras_t=True),
    "lms": Sampler(sample_lms, "sigma", "LMS"),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, "dpm", "DPM++ 2M"),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, "dpm", "DPM++ 2M SDE"),
    "dpmpp_2s_a": Sampler(sample_dpmpp_2s_a, "sigma", "DPM++ 2S a"),
    "dpmpp_sde": Sampler(sample_dpmpp_sde, "sigma", "DPM++ SDE"),
    "ddim": Sampler(sample_ddim, "vp", "DDIM"),
    "ddpm": Sampler(sample_ddpm, "vp", "DDPM", last_to_zero=True),
    "pndm": Sampler(sample_pndm, "vp", "PLMS"),
    "unipc": Sampler(sample_unipc, "dpm", "UniPC"),
    "lcm": Sampler(sample_lcm, "lcm", "LCM", last_to_zero=True),
    "tcd": Sampler(sample_tcd, "lcm", "TCD"),
}


def get_sigmas(name: str, steps: int, schedule: str = "normal", spacing: str | None = None,
               alphas_cumprod: torch.Tensor | None = None, steps_offset: int = 1) -> Schedule:
    """The sigmas and U-Net timesteps diffusers' scheduler for sampler ``name`` uses with ``steps`` steps (see
    schedules.family_sigmas for schedule, spacing and alphas_cumprod)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    row = SAMPLERS[name]
    return schedules.family_sigmas(row.family, steps, schedule, spacing, alphas_cumprod, steps_offset,
                                   round_karras_t=row.round_karras_t, last_to_zero=row.last_to_zero)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """img2img starting point at the first step of the (cut) schedule: x0 + sigma * noise. This is diffusers'
    add_noise for every scheduler: sigma schedulers add sigma * noise; DDIM-like ones give sqrt(a) x0 + sqrt(1-a)
    noise, whose VE form (divided by sqrt(a)) is the same."""
    return x0 + schedule.sigmas[0].to(x0) * noise


@torch.no_grad()
def sample(name: str, model, noise: torch.Tensor | None, schedule: Schedule, extra_args: dict | None = None,
           callback=None, generator=None, disable=None, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Run sampler ``name`` from ``noise`` (B, C, h, w) over ``schedule``; returns the final (VP) latents.

    txt2img: x = noise * schedule.init_noise_sigma. img2img: pass the clean latents x0 and the cut schedule
    ``schedule[strength_start(steps, strength):]``; x = add_noise(x0, noise, schedule). A refiner handoff passes
    noise=None and the handed-over latents as x0. A Denoiser model is
    given the schedule so its timesteps are exactly diffusers'.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    extra_args = dict(extra_args or {})
    if isinstance(model, Denoiser):  # so it feeds the U-Net the schedule's own timesteps (e.g. karras DPM-Solver's
        # rounded ones) instead of interpolating them; other models get the k-diffusion extra_args as given
        extra_args.setdefault("schedule", schedule)
    # noise None: x0 is already noised to sigmas[0] (the latents a denoising_end run handed over)
    x = noise * schedule.init_noise_sigma if x0 is None else x0 if noise is None else add_noise(x0, noise, schedule)
    sigmas = schedule.sigmas.to(x.device)
    # LCM / TCD work on the schedule's integer timesteps (boundary scalings, TCD's intermediate step s)
    kw = {"schedule": schedule} if SAMPLERS[name].family == "lcm" else {}
    return SAMPLERS[name].fn(model, x, sigmas, extra_args, callback=callback, generator=generator, disable=disable,
                             **kw)
