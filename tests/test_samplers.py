"""Schedules, denoiser and samplers against diffusers' schedulers, run the way StableDiffusionPipeline runs them.

A synthetic "U-Net" (nonlinear in x, t and the context) is driven both by our Denoiser + sampler and by a
diffusers-style loop (scale_model_input -> unet -> CFG -> scheduler.step(..., generator)); the final latents must
agree, including the per-step noise of the ancestral / SDE samplers drawn from the same CPU generator.
"""
import inspect
import types

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from latentdiff.sampling import samplers, schedules  # noqa: E402
from latentdiff.sampling.denoiser import Denoiser  # noqa: E402
from latentdiff.sampling.samplers import get_sigmas  # noqa: E402

SHAPE = (1, 4, 8, 8)
GUIDANCE = 7.5
# the released SD scheduler config (scheduler_config.json of SD 1.x)
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, trained_betas=None)


def _lms_quad_shim():
    """scipy is not installed here; diffusers' LMS integrates a polynomial of degree <= 3 with scipy's quad, which
    is exact for it, as is 4-point Gauss-Legendre. Give the LMS module that quad so its own code can run."""
    def quad(f, a, b, epsrel=None):
        nodes, weights = np.polynomial.legendre.leggauss(4)
        a, b = float(a), float(b)
        return (b - a) / 2 * sum(w * float(f((b - a) / 2 * n + (a + b) / 2)) for n, w in zip(nodes, weights)), 0.0
    return types.SimpleNamespace(quad=quad)


import diffusers.schedulers.scheduling_lms_discrete as _lms  # noqa: E402

if not hasattr(_lms, "integrate"):  # no scipy
    _lms.integrate = _lms_quad_shim()


class ToyUNet:
    """Deterministic stand-in for the U-Net: eps / v = tanh(mix(x) + f(t) + g(context)); nonlinear in all three,
    so any difference in the scaled input, the timestep or the CFG batch shows up in the result."""

    def __init__(self, seed=0, dim=8):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
        self.freq = 1 + torch.rand(4, generator=g) * 4
        self.phase = torch.randn(4, generator=g)
        self.proj = 0.5 * torch.randn(4, dim, generator=g)
        self.calls = 0

    def __call__(self, x, t, context, y=None):
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])  # diffusers passes a 0-dim t
        h = torch.einsum("oc,bchw->bohw", self.mix, x)
        h = h + torch.sin(self.freq * t[:, None] / 1000 * 3 + self.phase)[..., None, None]  # (B, 4, 1, 1)
        h = h + (context.mean(1) @ self.proj.T)[..., None, None] + 0.1 * x**2
        return torch.tanh(h)


def contexts():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)  # uncond, cond


def diffusers_scheduler(cls_name, prediction_type, **overrides):
    cls = _lms.LMSDiscreteScheduler if cls_name == "LMSDiscreteScheduler" else getattr(diffusers, cls_name)
    return cls.from_config({**SD_CONFIG, "prediction_type": prediction_type, **overrides})


def run_diffusers(sched, steps, unet, seed=0, step_kwargs=None):
    """StableDiffusionPipeline's denoising loop, verbatim in structure."""
    uncond, cond = contexts()
    gen = torch.Generator("cpu").manual_seed(seed)
    sched.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=gen) * sched.init_noise_sigma
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        out_u, out_c = unet(inp, t, torch.cat([uncond, cond])).chunk(2)
        out = out_u + GUIDANCE * (out_c - out_u)
        kw = dict(step_kwargs or {}, **({"generator": gen} if takes_gen else {}))
        latents = sched.step(out, t, latents, **kw).prev_sample
    return latents


def run_ours(name, schedule, unet, prediction_type, seed=0, **sampler_kwargs):
    uncond, cond = contexts()
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(SHAPE, generator=gen)
    den = Denoiser(unet, schedules.alphas_cumprod(), prediction_type)
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}, "guidance_scale": GUIDANCE}
    if sampler_kwargs:
        extra["schedule"] = schedule
        x = noise * schedule.init_noise_sigma
        return samplers.SAMPLERS[name].fn(den, x, schedule.sigmas, extra, generator=gen, disable=True, **sampler_kwargs)
    return samplers.sample(name, den, noise, schedule, extra, generator=gen, disable=True)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# (our name, diffusers class, diffusers overrides, our schedule, our spacing)
CASES = [
    ("euler", "EulerDiscreteScheduler", {}, "normal", None),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, "karras", None),
    ("euler", "EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "exponential", None),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}, "normal", "leading"),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "normal", "trailing"),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}, "normal", None),
    ("euler_a", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading"}, "normal", "leading"),
    ("heun", "HeunDiscreteScheduler", {}, "normal", None),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "karras", None),
    ("dpm2", "KDPM2DiscreteScheduler", {}, "normal", None),
    ("dpm2", "KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "karras", None),
    ("dpm2_a", "KDPM2AncestralDiscreteScheduler", {}, "normal", None),
    ("lms", "LMSDiscreteScheduler", {}, "normal", None),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, "karras", None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, "normal", None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "karras", None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}, "normal", "leading"),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "normal", None),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
     "karras", None),
    ("unipc", "UniPCMultistepScheduler", {}, "normal", None),
    ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, "karras", None),
    ("ddim", "DDIMScheduler", {}, "normal", None),
    ("ddim", "DDIMScheduler", {"timestep_spacing": "trailing"}, "normal", "trailing"),
    ("ddpm", "DDPMScheduler", {}, "normal", None),
    ("ddpm", "DDPMScheduler", {"timestep_spacing": "linspace"}, "normal", "linspace"),
    ("pndm", "PNDMScheduler", {}, "normal", None),
]


PARITY = [pytest.param(*c, p, id=f"{c[0]}-{c[3]}-{c[4] or 'default'}-{p}") for c in CASES
          for p in ("epsilon", "v_prediction") if not (c[0] == "pndm" and p == "v_prediction")]


@pytest.mark.parametrize("name,cls,overrides,schedule,spacing,prediction_type", PARITY)
def test_parity_with_diffusers(name, cls, overrides, schedule, spacing, prediction_type):
    unet = ToyUNet()
    ref = run_diffusers(diffusers_scheduler(cls, prediction_type, **overrides), 10, unet)
    ref_calls, unet.calls = unet.calls, 0
    sched = get_sigmas(name, 10, schedule, spacing)
    ours = run_ours(name, sched, unet, prediction_type)
    assert unet.calls == ref_calls  # same number of U-Net evaluations
    assert rel_err(ours, ref) < 1e-5, rel_err(ours, ref)


def test_pndm_v_prediction_differs_from_diffusers_by_design():
    """PLMS extrapolates the ODE derivative eps from past steps. For v models diffusers extrapolates the raw v
    outputs instead and converts the mix with the current sample (its warm-up step even mixes a v predicted at
    t-1 into the conversion at t), a different multistep method. We keep the eps one; it agrees with diffusers for
    epsilon models (tested above), and both are PLMS solutions of the same ODE, so they approach each other as the
    steps get finer."""
    unet = ToyUNet()
    err = {}
    for steps in (10, 40):
        ref = run_diffusers(diffusers_scheduler("PNDMScheduler", "v_prediction"), steps, unet)
        ours = run_ours("pndm", get_sigmas("pndm", steps), unet, "v_prediction")
        err[steps] = rel_err(ours, ref)
    assert err[40] < err[10] / 3, err


def test_dpm2_a_karras_midpoint_timestep():
    """With eta=1 the DPM2 ancestral midpoint sqrt(sigma * sigma_down) IS the next grid sigma. KDPM2Ancestral
    with karras sigmas rounds its grid timesteps but not its midpoint ones, so diffusers feeds the U-Net two
    timesteps (e.g. 916.28 and 916) for one sigma; a sigma -> t map can only give one, and ours gives the grid's.
    With diffusers' midpoint timesteps set to the grid ones, the runs agree exactly."""
    unet = ToyUNet()
    for prediction_type in ("epsilon", "v_prediction"):
        sched = diffusers_scheduler("KDPM2AncestralDiscreteScheduler", prediction_type, use_karras_sigmas=True)
        set_timesteps = sched.set_timesteps

        def grid_midpoints(n, _set=set_timesteps, _s=sched):
            _set(n)
            _s.timesteps[1:-1:2] = _s.timesteps[2::2]  # (t0, mid0, t1, mid1, t2, ...): mid_i -> t_{i+1}
        sched.set_timesteps = grid_midpoints
        ref = run_diffusers(sched, 10, unet)
        ours = run_ours("dpm2_a", get_sigmas("dpm2_a", 10, "karras"), unet, prediction_type)
        # 1e-4: a midpoint one ulp off its grid sigma still gets the interpolated t (1e-3 off the grid one)
        assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_parity(prediction_type):
    unet = ToyUNet()
    ref = run_diffusers(diffusers_scheduler("DDIMScheduler", prediction_type), 10, unet, step_kwargs={"eta": 1.0})
    ours = run_ours("ddim", get_sigmas("ddim", 10), unet, prediction_type, eta=1.0)
    assert rel_err(ours, ref) < 1e-5, rel_err(ours, ref)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2s_deterministic_matches_singlestep(prediction_type):
    """DPMSolverSinglestep (order 2) pairs grid steps into one 2S step whose midpoint is the odd grid point. On
    a log-uniform (exponential) grid that point is the log-midpoint k-diffusion's 2S uses, so diffusers with
    2M+1 steps equals our dpmpp_2s_a with eta=0 on the even grid points (the last step is Euler in both)."""
    toy = ToyUNet()

    def unet(x, t, context, y=None):  # DPMSolverSinglestep casts its (fractional) exponential timesteps to int64
        return toy(x, torch.as_tensor(t, dtype=torch.float32).floor(), context)

    ref = run_diffusers(diffusers_scheduler("DPMSolverSinglestepScheduler", prediction_type,
                                            use_exponential_sigmas=True), 11, unet)
    full = get_sigmas("dpmpp_2s_a", 11, "exponential")
    ref_t = diffusers_scheduler("DPMSolverSinglestepScheduler", prediction_type, use_exponential_sigmas=True)
    ref_t.set_timesteps(11)
    # grid t as diffusers truncates them (999.0 in float32 is 998.99999 before its int cast)
    sched = schedules.Schedule(torch.cat([full.sigmas[:-1:2], full.sigmas[-1:]]), ref_t.timesteps[::2].float(),
                               (1 + full.sigmas[0].item() ** 2) ** 0.5, full.log_sigmas)  # VP start, as diffusers
    ours = run_ours("dpmpp_2s_a", sched, unet, prediction_type, eta=0.0)
    assert rel_err(ours, ref) < 1e-5, rel_err(ours, ref)


@pytest.mark.parametrize("name,spacing,cls", [("euler", None, "EulerDiscreteScheduler"),
                                              ("ddim", None, "DDIMScheduler"),
                                              ("heun", None, "HeunDiscreteScheduler"),
                                              ("euler", "leading", "EulerDiscreteScheduler")])
def test_img2img_parity(name, spacing, cls):
    """StableDiffusionImg2ImgPipeline: get_timesteps (with scheduler.order) + set_begin_index + add_noise."""
    steps, strength = 10, 0.55
    unet = ToyUNet()
    uncond, cond = contexts()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))

    sched = diffusers_scheduler(cls, "epsilon", **({"timestep_spacing": spacing} if spacing else {}))
    sched.set_timesteps(steps)
    init_t = min(int(steps * strength), steps)
    t_start = max(steps - init_t, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    gen = torch.Generator().manual_seed(0)
    latents = sched.add_noise(x0, torch.randn(SHAPE, generator=gen), timesteps[:1])
    for t in timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        out_u, out_c = unet(inp, t, torch.cat([uncond, cond])).chunk(2)
        latents = sched.step(out_u + GUIDANCE * (out_c - out_u), t, latents).prev_sample

    start = schedules.strength_start(steps, strength)
    assert start == t_start
    cut = get_sigmas(name, steps, spacing=spacing)[start:]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=gen)
    den = Denoiser(unet, schedules.alphas_cumprod(), "epsilon")
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}, "guidance_scale": GUIDANCE}
    ours = samplers.sample(name, den, noise, cut, extra, generator=gen, disable=True, x0=x0)
    assert len(cut) == init_t
    assert rel_err(ours, latents) < 1e-5, rel_err(ours, latents)


# --- schedules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls,overrides,schedule,spacing", CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4] or 'default'}" for c in CASES])
def test_schedule_matches_diffusers(name, cls, overrides, schedule, spacing):
    """Our first sigma/timestep per step equal the ones diffusers uses (Heun/DPM2 interleave 2 per step)."""
    sched = diffusers_scheduler(cls, "epsilon", **overrides)
    sched.set_timesteps(10)
    ours = get_sigmas(name, 10, schedule, spacing)
    ref_t = sched.timesteps.double()
    if cls in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        ref_t = ref_t[::2]
    if cls == "PNDMScheduler":
        ref_t = torch.cat([ref_t[:1], ref_t[2:]])  # PLMS repeats its second timestep
    torch.testing.assert_close(ours.timesteps.double(), ref_t, atol=1e-4, rtol=0)
    if hasattr(sched, "sigmas") and sched.sigmas.numel() > 11:  # interleaved second-order schedulers
        ref_s = torch.cat([sched.sigmas[::2][:10], sched.sigmas[-1:]]).float()
    elif hasattr(sched, "sigmas"):
        ref_s = sched.sigmas.float()
    else:  # alpha-based: sigma of alphas_cumprod at each timestep
        a = sched.alphas_cumprod[sched.timesteps.unique(sorted=True).flip(0)]
        ref_s = torch.cat([((1 - a) / a) ** 0.5, ours.sigmas[-1:]])
    torch.testing.assert_close(ours.sigmas, ref_s, atol=0, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(ours.init_noise_sigma), _ve_init(sched, ours), rtol=1e-6, atol=0)


def _ve_init(sched, ours):
    """diffusers' init_noise_sigma in VE: sigma schedulers already are; alpha schedulers start at VP noise (1),
    i.e. sqrt(1 + sigma_max^2) in VE."""
    init = torch.as_tensor(sched.init_noise_sigma, dtype=torch.float32)
    if init == 1.0:
        init = (1 + ours.sigmas[0].double() ** 2).sqrt().float()
    return init


def test_final_sigma_quirks():
    ac = schedules.alphas_cumprod()
    sigma_min = ((1 - ac[0]) / ac[0]) ** 0.5
    for name in ("ddim", "pndm"):  # set_alpha_to_one=False: the last step lands on alphas_cumprod[0]
        assert get_sigmas(name, 10).sigmas[-1] == sigma_min
    for name in ("ddpm", "euler", "dpmpp_2m", "unipc"):
        assert get_sigmas(name, 10).sigmas[-1] == 0


def test_leading_spacing_init_noise_sigma():
    s = get_sigmas("euler", 10, spacing="leading")
    assert s.init_noise_sigma == pytest.approx((s.sigmas[0].item() ** 2 + 1) ** 0.5)
    assert s.timesteps[0] == 901 and s.timesteps[-1] == 1  # steps_offset 1


def test_sigma_to_t_off_grid_matches_diffusers():
    sched = diffusers_scheduler("EulerDiscreteScheduler", "epsilon")
    log_sigmas = np.log((((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy())
    sig = np.array([0.03, 0.5, 1.234, 7.0, 14.0])
    ref = sched._sigma_to_t(sig, log_sigmas)
    ours = schedules.sigma_to_t(torch.tensor(sig), torch.from_numpy(log_sigmas))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-3)


def test_schedule_slice():
    s = get_sigmas("euler", 10)
    cut = s[4:]
    assert len(cut) == 6 and torch.equal(cut.sigmas, s.sigmas[4:]) and torch.equal(cut.timesteps, s.timesteps[4:])
    with pytest.raises(ValueError, match="schedule\\[start:\\]"):
        s[2:5]


def test_rescale_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_rescale

    ac = schedules.alphas_cumprod()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ref = torch.cumprod(1 - ref_rescale(betas), 0)
    ours = schedules.rescale_zero_terminal_snr(ac)
    assert ours[-1] == 0
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours[0], ac[0])
    s = get_sigmas("euler", 10, alphas_cumprod=ours, spacing="trailing")  # sigma_max finite, as diffusers
    assert torch.isfinite(s.sigmas).all() and s.sigmas[0] > 1000


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="eulr", steps=10), "sampler must be one of"),
    (dict(name="euler", steps=0), "steps must be an integer in \\[1, 1000\\]"),
    (dict(name="euler", steps=1001), "steps must be an integer"),
    (dict(name="euler", steps=10, schedule="cosine"), "schedule must be one of"),
    (dict(name="euler", steps=10, spacing="even"), "spacing must be one of"),
])
def test_get_sigmas_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_sigmas(**kwargs)


def test_other_errors():
    with pytest.raises(ValueError, match="sampler must be one of"):
        samplers.sample("nope", lambda x, s: x, torch.zeros(SHAPE), get_sigmas("euler", 2), {})
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        Denoiser(ToyUNet(), schedules.alphas_cumprod(), "sample")
    with pytest.raises(ValueError, match="strength must be in"):
        schedules.strength_start(10, 1.5)


def test_every_sampler_registered_and_runs():
    # one table: every row names a schedule family (with its default spacing) and a distinct A1111 label
    assert all(row.family in schedules.DEFAULT_SPACING for row in samplers.SAMPLERS.values())
    assert len({row.a1111 for row in samplers.SAMPLERS.values()}) == len(samplers.SAMPLERS)
    assert all(row.fn.__name__ == f"sample_{name}" for name, row in samplers.SAMPLERS.items())
    den = Denoiser(ToyUNet(), schedules.alphas_cumprod(), "epsilon")
    for name in samplers.SAMPLERS:
        for sch in schedules.SCHEDULES:
            if samplers.SAMPLERS[name].family == "lcm" and sch != "normal":  # LCM / TCD: their own grid only
                with pytest.raises(ValueError, match="schedule must be 'normal' for LCM / TCD"):
                    get_sigmas(name, 4, sch)
                continue
            seen = []
            x = samplers.sample(name, den, torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)),
                                get_sigmas(name, 4, sch), {"cond": {"context": contexts()[1]}},
                                callback=lambda d: seen.append(d["i"]),
                                generator=torch.Generator().manual_seed(1), disable=True)
            assert torch.isfinite(x).all() and seen == [0, 1, 2, 3], (name, sch)


# --- denoiser ----------------------------------------------------------------------------------------------

def test_denoiser_cfg_rescale_and_concat():
    """One [uncond, cond] batch, CFG and rescale on the raw output (diffusers' rescale_noise_cfg), then x0."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    seen = {}

    def unet(x_in, t, context, y=None):
        seen.update(x_in=x_in, t=t, context=context, y=y)
        return torch.tanh(x_in[:, :4] * 1.3 + context.mean((1, 2))[:, None, None, None] + t[:, None, None, None] / 500)

    uncond, cond = contexts()
    y_u, y_c = torch.zeros(1, 6), torch.ones(1, 6)
    c_concat = torch.randn(1, 5, 8, 8)
    x = torch.randn(SHAPE) * 3
    sigma = torch.tensor(2.0)
    for pred in ("epsilon", "v_prediction"):
        den = Denoiser(unet, schedules.alphas_cumprod(), pred)
        x0 = den(x, sigma, {"context": cond, "y": y_c}, {"context": uncond, "y": y_u}, guidance_scale=5.0,
                 guidance_rescale=0.7, c_concat=c_concat)
        x_in = x / (sigma**2 + 1) ** 0.5
        assert torch.equal(seen["x_in"], torch.cat([x_in, c_concat], 1).repeat(2, 1, 1, 1))
        assert torch.equal(seen["context"], torch.cat([uncond, cond])) and torch.equal(seen["y"], torch.cat([y_u, y_c]))
        t = seen["t"]
        assert t.shape == (2,) and t[0] == t[1]
        out_u, out_c = unet(torch.cat([x_in, c_concat], 1).repeat(2, 1, 1, 1), t, torch.cat([uncond, cond])).chunk(2)
        out = rescale_noise_cfg(out_u + 5.0 * (out_c - out_u), out_c, guidance_rescale=0.7)
        if pred == "epsilon":
            ref = x - sigma * out
        else:  # diffusers' Euler v conversion
            ref = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        torch.testing.assert_close(x0, ref, atol=1e-5, rtol=1e-5)
    # guidance_scale <= 1: one cond batch, no uncond pass
    den(x, sigma, {"context": cond}, {"context": uncond}, guidance_scale=1.0)
    assert seen["x_in"].shape[0] == 1 and torch.equal(seen["context"], cond)


def test_denoiser_timestep_from_schedule():
    """Grid sigmas map to the schedule's own timesteps (fractional linspace ones, which log interpolation would
    not give back exactly); other sigmas fall back to diffusers' log-sigma interpolation."""
    sched = get_sigmas("euler", 30)
    den = Denoiser(lambda *a: None, schedules.alphas_cumprod())
    t = den.sigma_to_t(sched.sigmas[:-1], sched)
    torch.testing.assert_close(t, sched.timesteps, atol=0, rtol=0)
    assert (den.sigma_to_t(sched.sigmas[:-1]) - sched.timesteps).abs().max() > 1e-3  # the table matters
    mid = (sched.sigmas[1] * sched.sigmas[2]).sqrt()
    torch.testing.assert_close(den.sigma_to_t(mid, sched), den.sigma_to_t(mid))


# --- DPM++ SDE: no exact parity (Brownian tree), so test its limits ----------------------------------------

def gaussian_denoiser(mu=0.5, sd=0.5):
    """Exact x0 = E[x0 | x] for data x0 ~ N(mu, sd^2) per element."""
    return lambda x, sigma, **kw: mu + sd**2 / (sd**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - mu)


def test_dpmpp_sde_deterministic_limit():
    """eta=0 removes the noise: it is then the deterministic DPM-Solver++(2S), which has diffusers parity above,
    and with many steps it converges to the exact probability-flow ODE solution."""
    model = gaussian_denoiser()
    sched = get_sigmas("dpmpp_sde", 12)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    a = samplers.sample_dpmpp_sde(model, x, sched.sigmas, disable=True, eta=0.0)
    b = samplers.sample_dpmpp_2s_a(model, x, sched.sigmas, disable=True, eta=0.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    def ode_error(steps):
        s = get_sigmas("dpmpp_sde", steps, "karras")
        x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * s.sigmas[0]
        sigma_min = s.sigmas[-2]
        # closed-form ODE flow of Gaussian data to sigma_min, then the sampler's own last step x = D(x, sigma_min)
        x_min = 0.5 + (x_T - 0.5) * ((0.25 + sigma_min**2) / (0.25 + s.sigmas[0] ** 2)) ** 0.5
        exact = model(x_min, sigma_min.view(1))
        return (samplers.sample_dpmpp_sde(model, x_T, s.sigmas, disable=True, eta=0.0) - exact).abs().max()

    e20, e80 = ode_error(20), ode_error(80)
    assert e80 < 1e-3 and e80 < e20 / 10  # 2nd order: 4x the steps, ~16x smaller error


def test_dpmpp_sde_samples_the_data_distribution():
    """eta=1 with generator noise converges in distribution: the std error of the samples (65536 elements, s.e.
    ~0.0015) shrinks with the step count and ends within 0.01 of the data's (the last step to 0 alone shrinks it
    by 0.2%); the result depends on the generator and the same seed repeats it."""
    model = gaussian_denoiser()
    x_T = torch.randn((1, 4, 128, 128), generator=torch.Generator().manual_seed(0))
    err = {}
    for steps in (25, 100, 300):
        sched = get_sigmas("dpmpp_sde", steps, "karras")
        x = 0.5 + x_T * (sched.sigmas[0] ** 2 + 0.25) ** 0.5  # the exact marginal at sigma_max
        out = samplers.sample_dpmpp_sde(model, x, sched.sigmas, generator=torch.Generator().manual_seed(1),
                                        disable=True)
        assert abs(out.mean().item() - 0.5) < 0.005
        err[steps] = abs(out.std().item() - 0.5)
    assert err[300] < 0.01 and err[300] < err[100] < err[25] / 2, err
    again = samplers.sample_dpmpp_sde(model, x, sched.sigmas, generator=torch.Generator().manual_seed(1), disable=True)
    other = samplers.sample_dpmpp_sde(model, x, sched.sigmas, generator=torch.Generator().manual_seed(2), disable=True)
    assert torch.equal(out, again) and (out - other).abs().max() > 0.1
