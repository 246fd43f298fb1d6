"""Noise schedules: betas -> alphas_cumprod -> sigmas, timestep spacing, karras / exponential sigmas.

Everything here reproduces diffusers' ``set_timesteps`` (0.42) for the released SD scheduler config
(scaled_linear 0.00085 -> 0.012, 1000 steps, steps_offset 1, set_alpha_to_one False) number for number: the
arithmetic is done in numpy on the float32 training sigmas, as diffusers does, so the sigmas and the timesteps
fed to the U-Net come out bit-identical or within one float32 ulp.

Every sampler works in the variance-exploding (VE) space x = x0 + sigma * eps (k-diffusion's contract), with
sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]); the VP latent of diffusers is x / sqrt(1 + sigma^2).
Samplers come in three families by how diffusers builds their timesteps (each sampler's is its row in
``samplers.SAMPLERS``):

- "sigma": the k-diffusion ports (Euler, Heun, DPM2, LMS, DPM++ SDE, ...). Timesteps are fractional, sigmas are
  linearly interpolated in t; init noise is sigma_max (sqrt(sigma_max^2 + 1) with leading spacing, diffusers'
  quirk).
- "dpm": multistep DPM-Solver++ and UniPC. Integer timesteps from an (N+1)-point grid with the last point dropped;
  karras / exponential span the full training range; init noise is VP (1), i.e. sqrt(1 + sigma_max^2) in VE.
- "vp": DDIM, DDPM, PNDM. Integer timesteps, sigmas read from alphas_cumprod; DDIM / PNDM end at
  alphas_cumprod[0] (set_alpha_to_one False), i.e. at sigma_min, not 0. Init noise is VP, as above.
- "lcm": LCM and TCD (consistency models). Integer timesteps picked from the distillation grid of
  ``LCM_ORIGINAL_STEPS`` steps (diffusers' LCMScheduler / TCDScheduler ignore timestep_spacing); sigmas read from
  alphas_cumprod; LCM ends at 0, TCD at alphas_cumprod[0]. Init noise is VP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("normal", "karras", "exponential")
SPACINGS = ("linspace", "leading", "trailing")
# family -> the timestep_spacing each diffusers class of that family defaults to (the released SD configs set none)
DEFAULT_SPACING: dict[str, str] = {"sigma": "linspace", "dpm": "linspace", "vp": "leading", "lcm": "leading"}
# LCM / TCD distillation grid: the teacher's DDIM steps (Luo et al. 2023, "skipping-step" k = T // 50);
# diffusers' original_inference_steps default
LCM_ORIGINAL_STEPS = 50


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, T: int = 1000) -> torch.Tensor:
    """"scaled_linear" betas = linspace(sqrt(b0), sqrt(b1), T)^2 -> cumprod(1 - betas), (T,) float32 like diffusers."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def model_alphas_cumprod(cfg) -> torch.Tensor:
    """The training schedule of a ModelConfig: (T,) float32, zero-terminal-SNR rescaled when the model says so."""
    ac = alphas_cumprod(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    return rescale_zero_terminal_snr(ac) if cfg.zero_terminal_snr else ac


_sd_alphas_cumprod = alphas_cumprod  # family_sigmas' argument of the same name shadows it


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (Common Diffusion Noise Schedules and Sample Steps are Flawed), Alg. 1: shift and scale
    sqrt(alphas_cumprod) so the last step has zero SNR and the first is unchanged. Returns alphas_cumprod (T,)
    whose last entry is exactly 0 (sigma = inf); family_sigmas clamps it to 2**-24 as diffusers does."""
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * (a0 / (a0 - aT))
    return a**2


@dataclass(frozen=True)
class Schedule:
    """What a sampler run needs. ``schedule[k:]`` keeps the last steps (img2img)."""

    sigmas: torch.Tensor  # (N+1,) float32, descending; ends in 0 (sigma_min for DDIM / PNDM)
    timesteps: torch.Tensor  # (N,) float32: the exact U-Net timestep diffusers uses at sigmas[:-1]
    init_noise_sigma: float  # noise * this = the VE starting point (diffusers' init_noise_sigma, in VE)
    log_sigmas: torch.Tensor  # (T,) float32 log of the training sigmas, for sigma_to_t off the grid

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, s: slice) -> "Schedule":
        if not isinstance(s, slice) or s.step not in (None, 1) or s.stop is not None:
            raise ValueError(f"a Schedule can only be cut as schedule[start:], got {s!r}")
        return Schedule(self.sigmas[s], self.timesteps[s], self.init_noise_sigma, self.log_sigmas)

    def first(self, k: int) -> "Schedule":
        """The first k steps: they end at sigmas[k], not at 0 (a base model's part of a refiner handoff)."""
        return Schedule(self.sigmas[:k + 1], self.timesteps[:k], self.init_noise_sigma, self.log_sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """U-Net timestep for sigma (any shape): the schedule's own timestep where sigma is one of its grid
        sigmas, else diffusers' log-sigma interpolation (used for Heun/DPM2/SDE midpoints). "One of" allows a few
        float32 ulps: DPM2 ancestral's midpoint is the next grid sigma up to rounding, and should get one t."""
        sigma = torch.as_tensor(sigma)
        grid = self.sigmas[:-1].to(sigma.device)
        hit = torch.isclose(sigma.unsqueeze(-1).to(grid.dtype), grid, rtol=1e-6, atol=0)  # (..., N)
        t_grid = self.timesteps.to(sigma.device)[hit.int().argmax(-1)]
        return torch.where(hit.any(-1), t_grid, sigma_to_t(sigma, self.log_sigmas))


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``_sigma_to_t``: linear interpolation of t in log sigma between neighbouring training steps,
    clamped to [0, T-1]. sigma any shape; returns float32 of the same shape."""
    log_sigmas = log_sigmas.to(sigma.device, torch.float64)
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
    low = (log_sigma.unsqueeze(-1) >= log_sigmas).sum(-1).sub(1).clamp(0, len(log_sigmas) - 2)  # last step <= sigma
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).float()


def strength_start(steps: int, strength: float) -> int:
    """img2img: diffusers runs the last int(steps * strength) steps; returns the index of the first one, so
    ``schedule[strength_start(steps, strength):]`` is what diffusers' get_timesteps keeps (its ``* order`` only
    undoes the interleaving of Heun/DPM2 timesteps, which our schedules don't have)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return steps - min(int(steps * strength), steps)


def handoff_index(schedule: Schedule, fraction: float, T: int = 1000) -> int:
    """Base + refiner split (diffusers' SDXL `denoising_end` / `denoising_start`): the number of steps whose
    timestep is >= round(T - fraction * T). The base runs ``schedule.first(k)`` and hands its noisy latents (at
    sigmas[k]) to the refiner, which runs ``schedule[k:]`` from them without adding noise."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"denoising_start / denoising_end must be in (0, 1), got {fraction!r}")
    return int((schedule.timesteps >= int(round(T - fraction * T))).sum())


def family_sigmas(family: str, steps: int, schedule: str = "normal", spacing: str | None = None,
                  alphas_cumprod: torch.Tensor | None = None, steps_offset: int = 1, *, round_karras_t: bool = False,
                  last_to_zero: bool = False) -> Schedule:
    """The sigmas and U-Net timesteps diffusers' scheduler of a sampler family ("sigma" | "dpm" | "vp") uses with
    ``steps`` steps; samplers.get_sigmas(name, ...) passes a sampler's family and its two quirks:
    round_karras_t (KDPM2(Ancestral)Discrete round their karras timesteps) and last_to_zero (DDPM and LCM step
    to alpha = 1 at the end, DDIM / PNDM / TCD to alphas_cumprod[0]).

    schedule: "normal" (the spacing's own timesteps), "karras" (Karras et al. 2022, rho 7; diffusers'
    use_karras_sigmas) or "exponential" (log-uniform sigmas; use_exponential_sigmas).
    spacing: "linspace" | "leading" | "trailing" (diffusers' timestep_spacing); None = the sampler family's
    DEFAULT_SPACING.
    alphas_cumprod: (T,) training schedule; None = SD's scaled_linear 0.00085 -> 0.012, T = 1000.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    spacing = DEFAULT_SPACING[family] if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    ac = (_sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).float().cpu()
    T = len(ac)
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    ac = ac.clamp(min=2**-24)  # zero-terminal-SNR schedules: diffusers' finite stand-in for sigma = inf
    train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # (T,) float32, as diffusers computes it
    log_sigmas = np.log(train_sigmas)
    N = steps

    if family == "sigma":
        t = _spacing_float(spacing, N, T, steps_offset)
        sigmas = np.interp(t, np.arange(T), train_sigmas)  # float64
        if schedule != "normal":
            sigmas = _karras_or_exp(schedule, sigmas[-1], sigmas[0], N)
            t = _sigma_to_t_np(sigmas, log_sigmas)
            if schedule == "karras" and round_karras_t:
                t = t.round()
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        smax = float(sigmas.max())
        init = smax if spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
    elif family == "dpm":
        t = _spacing_dpm(spacing, N, T, steps_offset)
        if schedule == "normal":
            sigmas = np.interp(t, np.arange(T), train_sigmas)
        else:
            sigmas = _karras_or_exp(schedule, float(train_sigmas[0]), float(train_sigmas[-1]), N)
            t = _sigma_to_t_np(sigmas, log_sigmas)
            if schedule == "karras":
                t = t.round()  # DPMSolverMultistep / UniPC round karras timesteps
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        init = (float(sigmas[0]) ** 2 + 1) ** 0.5
    elif family == "lcm":
        if schedule != "normal":
            raise ValueError(f"schedule must be 'normal' for LCM / TCD (their own timestep grid), got {schedule!r}")
        t = _lcm_timesteps(N, T)
        last = 0.0 if last_to_zero else float(train_sigmas[0])  # TCD's last step goes to s = 0: alphas_cumprod[0]
        sigmas = np.append(train_sigmas[t], last).astype(np.float32)
        init = (float(sigmas[0]) ** 2 + 1) ** 0.5
    else:  # vp
        # DDIM / PNDM step from t to t - T//N. With leading spacing (their default) and with trailing when N
        # divides T that is the next grid timestep; otherwise diffusers lands a few timesteps off the next grid
        # point and restarts from there as if it were on it. We step grid point to grid point instead.
        if schedule == "normal":
            t = _spacing_int(spacing, N, T, steps_offset)
            sigmas = train_sigmas[t]
            if last_to_zero:
                last = 0.0  # DDPM steps to the next grid timestep, the last one to alpha = 1
            else:  # DDIM / PNDM step to t - T//N, and below 0 to alphas_cumprod[0]
                prev = int(t[-1]) - T // N
                last = float(train_sigmas[max(prev, 0)])
        else:  # no diffusers counterpart: the full-range karras / exponential grid, ending at 0
            sigmas = _karras_or_exp(schedule, float(train_sigmas[0]), float(train_sigmas[-1]), N)
            t = _sigma_to_t_np(sigmas, log_sigmas)
            last = 0.0
        sigmas = np.append(sigmas, last).astype(np.float32)
        init = (float(sigmas[0]) ** 2 + 1) ** 0.5
    return Schedule(torch.from_numpy(sigmas), torch.from_numpy(np.asarray(t, dtype=np.float32)), init,
                    torch.from_numpy(log_sigmas))


# --- diffusers' timestep grids -------------------------------------------------------------------------------

def _spacing_float(spacing: str, N: int, T: int, offset: int) -> np.ndarray:
    """Euler / Heun / KDPM2 / LMS / DPMSolverSDE: (N,) descending float timesteps."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(N) * (T // N)).round()[::-1].astype(np.float32) + offset
    return np.arange(T, 0, -T / N).round().astype(np.float32) - 1


def _spacing_dpm(spacing: str, N: int, T: int, offset: int) -> np.ndarray:
    """DPMSolverMultistep / UniPC: an (N+1)-point grid without its last point, integers."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, N + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(N + 1) * (T // (N + 1))).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(T, 0, -T / N).round().astype(np.int64) - 1


def _spacing_int(spacing: str, N: int, T: int, offset: int) -> np.ndarray:
    """DDIM / DDPM / PNDM: (N,) descending integer timesteps."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(N) * (T // N))[::-1].astype(np.int64) + offset
    return np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1


def _lcm_timesteps(N: int, T: int) -> np.ndarray:
    """LCMScheduler / TCDScheduler.set_timesteps: the grid k-1, 2k-1, ..., T-1 (k = T // 50), reversed, at N
    evenly spaced indices: 4 steps -> [999, 759, 499, 259]."""
    if N > LCM_ORIGINAL_STEPS:
        raise ValueError(f"steps must be at most {LCM_ORIGINAL_STEPS} for LCM / TCD (their distillation grid), got {N}")
    grid = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * (T // LCM_ORIGINAL_STEPS) - 1)[::-1]
    return grid[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, N, endpoint=False)).astype(np.int64)]


def _karras_or_exp(schedule: str, sigma_min: float, sigma_max: float, N: int) -> np.ndarray:
    """(N,) float64 from sigma_max down to sigma_min."""
    if schedule == "karras":  # Karras et al. 2022, eq. 5, rho = 7
        rho = 7.0
        ramp = np.linspace(0, 1, N)
        return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), N))


def _sigma_to_t_np(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t, vectorised, same numpy arithmetic (float32 table, float64 query)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)
