"""Every sampler, k-diffusion's contract: ``sample_<name>(model, x, sigmas, extra_args, callback, generator, disable)``.

model(x, sigma, **extra_args) -> x0 in VE space (x = x0 + sigma * eps); x arrives already scaled by the initial
noise level; sigmas (N+1,) descending, from ``get_sigmas`` (it ends in 0, or in sigma_min for DDIM /
PNDM). Per-step noise is ``torch.randn`` from ``generator`` in the order and shape diffusers' scheduler draws it,
so a CPU generator seeded like diffusers' pipeline gives the same latents. callback({"i", "sigma", "x",
"denoised"}) runs once per step. The diffusers scheduler each one reproduces is named in its docstring;
DDIM / DDPM / PNDM / UniPC / DPM-Solver are rewritten from alphas to sigmas with alphas_cumprod = 1/(1+sigma^2).

``SAMPLERS`` at the end is the one sampler table (function, schedule family, A1111 label): a new sampler is its
function plus one row there. The k-diffusion family is here; DDIM, DDPM, PNDM, LCM and TCD are in vp.py, the
step helpers they share in steps.py.
"""
from __future__ import annotations

import inspect
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
from .steps import ancestral_step, randn, report, setup, to_d
from .vp import sample_ddim, sample_ddpm, sample_lcm, sample_pndm, sample_tcd


# --- k-diffusion samplers (Karras et al. 2022 and successors) -----------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn). = EulerDiscrete."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_a(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, eta=1.0):
    """Ancestral Euler (k-diffusion; the DDPM ancestral step of Ho et al. 2020 in sigma form).
    = EulerAncestralDiscrete, which draws noise at every step, the last one included. eta scales the fresh noise
    (k-diffusion's / A1111's; diffusers has none: 1); 0 is Euler."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        x = x + randn(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); Euler for the last step to 0. = HeunDiscrete."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm2(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """DPM-Solver-2 midpoint in log sigma (Lu et al. 2022, as in k-diffusion / Karras et al. 2022 "DPM2").
    = KDPM2Discrete (its midpoint computed with the same float32 lerp, so the timestep matches too)."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_mid = sigmas[i + 1].log().lerp(sigmas[i].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm2_a(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """Ancestral DPM-Solver-2 (k-diffusion). = KDPM2AncestralDiscrete: noise after each 2nd-order step, none on
    the final Euler step to 0. Its midpoint is the next grid sigma (up to rounding), so the Denoiser gives it that
    grid timestep; diffusers' karras variant feeds the unrounded one there (< 0.5 timestep apart)."""
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigma_down - sigmas[i])
        x = x + randn(x, generator) * sigma_up
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
    extra_args, s_in = setup(x, extra_args)
    order = 4
    sigmas_np = sigmas.double().cpu().numpy()
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coeff(cur, sigmas_np, i, j) * d for j, d in enumerate(reversed(ds)))
    return x


# --- DPM-Solver++ family (Lu et al. 2022, "DPM-Solver++"), in log-SNR time lambda = -log sigma ------------------

@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """DPM-Solver++(2M), multistep 2nd order; 1st order on the first step and on the last step to 0.
    = DPMSolverMultistep(algorithm_type="dpmsolver++", solver_order=2) with its lower_order_final."""
    extra_args, s_in = setup(x, extra_args)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
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
    extra_args, s_in = setup(x, extra_args)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        noise = randn(x, generator)
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
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigma_down.log()
            sigma_mid = (sigmas[i].log() - h / 2).exp()
            x_2 = sigma_mid / sigmas[i] * x - torch.expm1(-h / 2) * denoised
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = sigma_down / sigmas[i] * x - torch.expm1(-h) * denoised_2
        if eta > 0 and sigmas[i + 1] > 0:
            x = x + randn(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, eta=1.0):
    """DPM-Solver++ SDE, 2 stages with the midpoint halfway in log sigma (k-diffusion's sample_dpmpp_sde, r=1/2).

    diffusers' DPMSolverSDE runs the same steps but takes its noise from a torchsde Brownian tree (noise at the
    midpoint and at the step end are correlated increments of one Brownian path), which a torch.Generator cannot
    reproduce; here both are independent draws from ``generator`` (midpoint first). Same marginals, not the same
    numbers; the tests check the deterministic limit (eta=0) and the sampled distribution instead.
    """
    extra_args, s_in = setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        sigma_mid = (-(t + (t_next - t) / 2)).exp()
        sd, su = ancestral_step(sigmas[i], sigma_mid, eta)
        x_2 = sd / sigmas[i] * x - torch.expm1(t + sd.log()) * denoised
        if eta > 0:
            x_2 = x_2 + randn(x, generator) * su
        denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
        sd, su = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = sd / sigmas[i] * x - torch.expm1(t + sd.log()) * denoised_2
        if eta > 0:
            x = x + randn(x, generator) * su
    return x


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None):
    """UniPC, B(h) = e^h - 1 ("bh2"), order 2, data prediction (Zhao et al. 2023): a multistep predictor, and a
    corrector that reuses the model output at the predicted point. = UniPCMultistep with its lower_order_final."""
    extra_args, s_in = setup(x, extra_args)
    N = len(sigmas) - 1
    lam = -sigmas.log()  # (N+1,) log-SNR; +inf at sigma 0
    ms, x_last, order_last = [], None, 0  # ms: x0 predictions, newest last
    for i in trange(N, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report(callback, i, sigmas[i], x, denoised)
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


def eta_samplers() -> list[str]:
    """Samplers with a noise amount `eta`: DDIM's sigma_t(eta) (0 default), TCD's gamma (0.3), k-diffusion's
    multiplier of the fresh noise in euler_a, dpmpp_2s_a, dpmpp_sde (1)."""
    return sorted(n for n, row in SAMPLERS.items() if "eta" in inspect.signature(row.fn).parameters)


def check_eta(name: str, eta: float | None) -> None:
    if eta is None:
        return
    if name not in eta_samplers():
        raise ValueError(f"sampler {name!r} takes no eta; eta is for {eta_samplers()}")
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= (1.0 if name == "tcd" else float("inf")):
        raise ValueError(f"eta for {name!r} must be {'in [0, 1]' if name == 'tcd' else '>= 0'}, got {eta!r}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """img2img starting point at the first step of the (cut) schedule: x0 + sigma * noise. This is diffusers'
    add_noise for every scheduler: sigma schedulers add sigma * noise; DDIM-like ones give sqrt(a) x0 + sqrt(1-a)
    noise, whose VE form (divided by sqrt(a)) is the same."""
    return x0 + schedule.sigmas[0].to(x0) * noise


@torch.no_grad()
def sample(name: str, model, noise: torch.Tensor | None, schedule: Schedule, extra_args: dict | None = None,
           callback=None, generator=None, disable=None, x0: torch.Tensor | None = None,
           eta: float | None = None) -> torch.Tensor:
    """Run sampler ``name`` from ``noise`` (B, C, h, w) over ``schedule``; returns the final (VP) latents.

    txt2img: x = noise * schedule.init_noise_sigma. img2img: pass the clean latents x0 and the cut schedule
    ``schedule[strength_start(steps, strength):]``; x = add_noise(x0, noise, schedule). A refiner handoff passes
    noise=None and the handed-over latents as x0. A Denoiser model is
    given the schedule so its timesteps are exactly diffusers'. ``eta`` (None: the sampler's default) is the
    noise of the samplers that take one (check_eta).
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    check_eta(name, eta)
    extra_args = dict(extra_args or {})
    if isinstance(model, Denoiser):  # so it feeds the U-Net the schedule's own timesteps (e.g. karras DPM-Solver's
        # rounded ones) instead of interpolating them; other models get the k-diffusion extra_args as given
        extra_args.setdefault("schedule", schedule)
    # noise None: x0 is already noised to sigmas[0] (the latents a denoising_end run handed over)
    x = noise * schedule.init_noise_sigma if x0 is None else x0 if noise is None else add_noise(x0, noise, schedule)
    sigmas = schedule.sigmas.to(x.device)
    # LCM / TCD work on the schedule's integer timesteps (boundary scalings, TCD's intermediate step s)
    kw = {"schedule": schedule} if SAMPLERS[name].family == "lcm" else {}
    if eta is not None:
        kw["eta"] = eta
    return SAMPLERS[name].fn(model, x, sigmas, extra_args, callback=callback, generator=generator, disable=disable,
                             **kw)
