"""Pipeline: text-to-image (and img2img / inpaint) around a U-Net, a VAE and one or two text encoders.

    prompt -> tokens -> context (B, 77k, D) [+ pooled]      seed -> noise (B, 4, H/f, W/f)
    denoiser(x, sigma) = CFG(UNet(x * c_in, t(sigma), context)) -> x0;  sampler(denoiser, sigmas) -> latents
    latents / scaling_factor -> VAE.decode -> images

Same weights, seed (CPU generator) and sampler give the same latents as diffusers' pipelines.
"""
from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import fewstep, speed
from .adapters.active import ActiveAdapters, untagged
from .config import ModelConfig
from .images import format_parameters, resize, to_pil, to_tensor
from .loading import Loading
from .models.text import Tokenizer
from .models.unet import sdxl_vector, size_numbers
from .prompt import encode_prompts
from .sampling import samplers, schedules
from .sampling.denoiser import Denoiser

log = logging.getLogger("latentdiff")


@dataclass(frozen=True)
class Conditioning:
    """The prompt encodings the sampler uses, for B prompts and their negatives."""
    context: torch.Tensor  # (B, 77k, D)
    pooled: torch.Tensor | None  # (B, P) for SDXL, else None
    uncond_context: torch.Tensor  # (B, 77k', D), the negative prompts
    uncond_pooled: torch.Tensor | None


class Pipeline(Loading):
    def __init__(self, cfg: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoders: nn.ModuleList,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, source: str | None = None,
                 exact: bool | None = None):
        self.cfg, self.unet, self.vae, self.text_encoders = cfg, unet, vae, text_encoders
        self.tokenizer = Tokenizer()
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        # exact: never prepack conv weights (see speed.packed), so fp32 is bit for bit diffusers' fp32.
        # None = exact in fp32; latentdiff.load() passes False for its default dtype, True for an explicit fp32.
        self.exact = dtype == torch.float32 if exact is None else exact
        for m in (unet, vae, text_encoders):
            m.eval().requires_grad_(False)
        self.alphas_cumprod = schedules.model_alphas_cumprod(cfg)
        self.offload = False  # see enable_offload()
        self.tile_decode_above = 128  # latent side above which decode() tiles (1024 px for SD)
        self._prompt_cache: dict[tuple, Conditioning] = {}  # repeated prompts: encode once
        self._compiled_unet = None  # see compile()
        self.preview_decoder = None  # see load_preview() / preview()
        self.last_seed: int | None = None  # the seed of the last call (drawn at random for seed=None)
        self.adapters = ActiveAdapters(unet, text_encoders)  # LoRAs, embeddings (see load_lora, load_embedding)

    # --- conditioning -------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      clip_skip: int | None = None) -> Conditioning:
        """The conditioning for a prompt (or list) and its negative. Long prompts become 77k tokens, emphasis
        weights apply (see prompt.py). SDXL follows diffusers' `force_zeros_for_empty_prompt`: with no negative
        prompt the unconditional context and pooled vector are zeros."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str) or negative_prompt is None:
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        key = (tuple(prompts), tuple(negatives), negative_prompt is None, clip_skip)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        speed.check_text_encoders(self.text_encoders, f"encoding the prompt {prompts[0]!r}")
        with torch.inference_mode(), speed.on_device(self.text_encoders, self.device, self.offload):
            c, cp, u, up = encode_prompts(self.tokenizer, list(self.text_encoders), prompts, negatives,
                                          clip_skip=clip_skip, embeddings=self.adapters.embeddings)
        if self.cfg.family == "sdxl" and negative_prompt is None:
            u, up = torch.zeros_like(u), torch.zeros_like(up)
        if len(self._prompt_cache) >= 16:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        self._prompt_cache[key] = Conditioning(c, cp, u, up)
        return self._prompt_cache[key]

    def _unet_cond(self, context: torch.Tensor, pooled: torch.Tensor | None, n: int, h: int, w: int,
                   aesthetic_score: float) -> dict:
        """Conditioning dict for the denoiser, each prompt repeated n times: prompts p0 p0 p1 p1 (diffusers' order)."""
        out = {"context": context.repeat_interleave(n, 0).to(self.device, self.dtype)}
        if self.cfg.unet.adm_in_channels:
            # SDXL size conditioning as diffusers': original = target = (H, W), crop (0, 0); the refiner has
            # the aesthetic score in place of the target size
            nums = size_numbers(h, w, self.cfg.family == "sdxl_refiner", aesthetic_score)
            size = torch.tensor([nums], dtype=torch.float32).expand(pooled.shape[0], len(nums))
            y = sdxl_vector(pooled.float(), size, self.cfg.unet.adm_in_channels)
            out["y"] = y.repeat_interleave(n, 0).to(self.device, self.dtype)
        return out

    def _unet_fn(self, x, t, context, y=None, **kw):
        # Latents stay fp32 in the sampler; the U-Net runs in the pipeline dtype. kw: control (ControlNet
        # residuals), guidance (LCM-distilled)
        if self._compiled_unet is None:
            with speed.packed(self.unet, self.device, self.exact, self.offload):
                return self.unet(x.to(self.dtype), t.to(x.device), context, y, **kw).float()
        # inductor reads `freezing` from its global config when it compiles (first call, each new shape):
        # torch.compile(..., options={"freezing": True}) was measured not to freeze (slower than eager)
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._compiled_unet(x.to(self.dtype), t.to(x.device), context, y, **kw).float()

    # --- generation ---------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], **kw):
        """Text to image. Keywords (all optional): guidance_scale, steps, negative_prompt, seed (None = random,
        see `last_seed`), sampler, schedule ("normal" | "karras" | "exponential"), timestep_spacing, height, width,
        num_images (per prompt), output ("pil" | "latent"), guidance_rescale, clip_skip, callback, progress,
        decoder ("vae" | "taesd": a loaded TAESD decoder instead of the VAE, see latentdiff/fewstep.py), eta (the
        noise of ddim / tcd / euler_a, dpmpp_2s_a, dpmpp_sde; None = each one's default: 0 / 0.3 / 1),
        keep_text_encoders (False: free the text encoders' weights once the prompts are encoded, speed.py).
        Returns a list of PIL images, or the final latents (B, 4, H/f, W/f), not divided by the VAE scaling
        factor, with output="latent". callback(step, sigma, latents) runs after every step.
        Refiner handoff (diffusers' SDXL semantics): `denoising_end=0.8` with output="latent" stops at the step
        where 80% of the noise schedule is done and returns the still-noisy latents; pass them to the refiner's
        `img2img(prompt, latents, denoising_start=0.8)` (same steps and sampler), which runs the rest without
        adding noise. SDXL refiner models take `aesthetic_score` (6.0) and `negative_aesthetic_score` (2.5).
        ControlNet (also for img2img / inpaint): controlnet=latentdiff.load_controlnet(path) or a list of them,
        control_image (PIL, or a tensor in [0, 1]; one per ControlNet), controlnet_scale, control_start /
        control_end (fractions of the steps it acts in), guess_mode; see latentdiff/control.py."""
        return self._generate(prompt, **kw)

    def img2img(self, prompt: str | list[str], image, strength: float = 0.75, **kw):
        """Image to image with diffusers' strength semantics: the image is encoded (posterior sample from the
        seed's generator), noised to the first of the last int(steps * strength) steps, and sampled from there.
        `image`: PIL image or tensor (3, H, W) / (B, 3, H, W) in [-1, 1]; its size is the output size unless
        height / width are given. A (B, 4, h, w) tensor is taken as latents (scaled, as output="latent" gives
        them): clean ones with strength, or a base model's denoising_end output with `denoising_start`. Other
        keywords as in __call__."""
        return self._generate(prompt, image=image, strength=strength, **kw)

    def inpaint(self, prompt: str | list[str], image, mask, strength: float = 1.0, **kw):
        """Repaint where `mask` is white (1), keep where it is black (0).

        9-channel inpainting checkpoints get (mask, masked-image latent) concatenated to the U-Net input, as in
        diffusers' StableDiffusionInpaintPipeline. Regular checkpoints blend the known region back at every
        model call (ComfyUI's rule: x = x*m + (x0 + sigma*noise)*(1-m) before, x0 restored after), so the kept
        pixels come back exactly up to the VAE round trip."""
        return self._generate(prompt, image=image, mask=mask, strength=strength, **kw)

    def _generate(self, prompt, *, negative_prompt=None, **kw):
        """LoRA prompt tags apply for this call only: merged, the tags cut from the text, undone afterwards."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [] if negative_prompt is None else [negative_prompt] if isinstance(negative_prompt, str) \
            else list(negative_prompt)
        with self.adapters.prompt_loras(texts + negatives, self._weights_changed) as lora_hashes:
            return self._images(untagged(prompt), negative_prompt=untagged(negative_prompt), written=(
                prompt, negative_prompt, lora_hashes), **kw)

    def _images(self, prompt, *, written, image=None, mask=None, strength=1.0, guidance_scale=None, steps=None,
                negative_prompt=None, seed=0, sampler=None, schedule="normal", timestep_spacing=None, height=None,
                width=None, num_images=1, output="pil", guidance_rescale=0.0, clip_skip=None, callback=None,
                progress=True, denoising_start=None, denoising_end=None, aesthetic_score=6.0,
                negative_aesthetic_score=2.5, controlnet=None, control_image=None, controlnet_scale=1.0,
                control_start=0.0, control_end=1.0, guess_mode=False, decoder="vae", keep_text_encoders=True,
                eta=None):
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        control = None  # ControlNets (latentdiff/control.py), validated before anything runs
        if controlnet is not None:
            from .control import Control

            control = Control(self.cfg.unet, controlnet, control_image, controlnet_scale, control_start,
                              control_end, guess_mode)
            if image is None:  # txt2img: the output takes the control image's size, as in diffusers
                h, w = control.default_size(self.cfg.vae.downsample)
                height, width = height or h, width or w
        steps = self.cfg.steps if steps is None else steps
        sampler = sampler or self.cfg.sampler
        f = self.cfg.vae.downsample
        latents_in = _latents_given(image, self.cfg.vae.z_channels)  # (1 or B, 4, h, w) or None
        if latents_in is not None:
            height, width = latents_in.shape[-2] * f, latents_in.shape[-1] * f
            if mask is not None:
                raise ValueError("inpaint needs the image as pixels, not latents")
            image = None
        elif image is not None:
            image = to_tensor(image, "image")  # (1 or B, 3, H, W) in [-1, 1]
            height, width = height or image.shape[-2], width or image.shape[-1]
        if denoising_start is not None and latents_in is None:
            raise ValueError("denoising_start continues a denoising_end run: pass its latents as the image")
        height, width = height or self.cfg.size, width or self.cfg.size
        self._check_args(steps=steps, sampler=sampler, height=height, width=width, num_images=num_images,
                         output=output, guidance_scale=guidance_scale, timestep_spacing=timestep_spacing,
                         strength=strength)
        samplers.check_eta(sampler, eta)
        fewstep.check_decoder(decoder, self.preview_decoder, self.source or self.cfg.name)
        seed = self._seed(seed)
        timestep_spacing = timestep_spacing or self.cfg.timestep_spacing
        cond = self.encode_prompt(prompt, negative_prompt, clip_skip)
        if not keep_text_encoders:  # free their weights for the rest of the call and after (speed.py)
            speed.release_text_encoders(self.text_encoders)
        B = cond.context.shape[0] * num_images
        if control is not None:
            control.prepare(height, width, cond.context.shape[0], num_images, f)
        shape = (B, self.cfg.unet.out_channels, height // f, width // f)
        generator = torch.Generator("cpu").manual_seed(seed)
        sched = samplers.get_sigmas(sampler, steps, schedule, timestep_spacing, alphas_cumprod=self.alphas_cumprod)
        start = (schedules.strength_start(steps, strength) if denoising_start is None else
                 schedules.handoff_index(sched, denoising_start))
        end = steps if denoising_end is None else schedules.handoff_index(sched, denoising_end)
        if start >= end:
            raise ValueError(f"strength={strength}, denoising_start={denoising_start}, denoising_end={denoising_end} "
                             f"with steps={steps} leave no step to run")
        sched = sched.first(end)[start:]
        x0 = c_concat = blend = None
        inpaint9 = self.cfg.unet.in_channels == self.cfg.unet.out_channels + 5
        if inpaint9 and mask is None:
            raise ValueError("this is an inpainting checkpoint (9 input channels): use pipe.inpaint(prompt, image, "
                             "mask)")
        if mask is not None:
            m = to_tensor(mask, "mask", gray=True)  # (1 or B, 1, Hm, Wm) in [0, 1]
            if m.shape[-2:] != image.shape[-2:]:
                raise ValueError(f"mask size {tuple(m.shape[-2:])[::-1]} differs from the image size "
                                 f"{tuple(image.shape[-2:])[::-1]} (width x height); they must be equal")
            m = (resize(m, height, width) >= 0.5).float().expand(B, -1, -1, -1)  # binarised as diffusers
            m_lat = F.interpolate(m, size=shape[-2:])  # (B, 1, h, w), nearest
        if image is not None:
            image = resize(image, height, width).expand(B, -1, -1, -1)
        # generator draws, in diffusers' order: [image posterior], noise, [masked-image posterior]
        if latents_in is not None:
            if latents_in.shape[0] not in (1, B) or latents_in.shape[1:] != shape[1:]:
                raise ValueError(f"image latents {tuple(latents_in.shape)} do not fit {B} images of {shape[1:]}")
            x0 = latents_in.expand(shape).to(self.device)
        elif image is not None and (mask is None or start > 0 or not inpaint9):
            x0 = self._encode_image(image, generator)
        # a handoff's latents are already noisy: nothing is drawn (diffusers' add_noise=False)
        noise = None if denoising_start is not None else torch.randn(shape, generator=generator).to(self.device)
        if mask is not None and inpaint9:
            masked = self._encode_image(image * (m < 0.5), generator)
            c_concat = torch.cat([m_lat.to(self.device), masked], 1)  # (B, 5, h, w)
        elif mask is not None:
            blend = (m_lat.to(self.device), x0, noise)
        x0_start = None if mask is not None and start == 0 else x0  # inpaint at strength 1: pure noise, as diffusers
        latents = self._sample(sampler, noise, sched, cond, num_images, height, width, guidance_scale,
                               guidance_rescale, generator, callback, progress, c_concat, x0_start, blend,
                               (aesthetic_score, negative_aesthetic_score), control, eta)
        self.last_seed = seed
        if output == "latent":
            return latents
        prompt, negative_prompt, lora_hashes = written  # the PNG keeps the tags: --from-png applies them again
        params = dict(prompt=prompt, negative_prompt=negative_prompt or "", steps=steps, sampler=sampler,
                      schedule=schedule, guidance_scale=guidance_scale, seed=seed, height=height, width=width)
        if lora_hashes:
            params["lora_hashes"] = lora_hashes
        if image is not None:
            params["strength"] = strength
        if eta is not None:
            params["eta"] = eta
        if control is not None:
            params["controlnets"] = control.infotext()
        return self.decode(latents, params, decoder)

    def _encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w), a posterior sample as diffusers draws it."""
        with torch.inference_mode(), self._running(self.vae):
            post = self.vae.encode(image.to(self.device, self.dtype))
            return post.sample(generator).float() * self.cfg.vae.scaling_factor

    def _sample(self, sampler, x, sched, cond: Conditioning, n, h, w, guidance_scale, guidance_rescale, generator,
                callback, progress, c_concat=None, x0=None, blend=None, scores=(6.0, 2.5), control=None, eta=None):
        unet_fn = self._unet_fn if control is None else control.unet_fn(
            self._unet_fn, sched, guidance_scale > 1, self.device, self.dtype, self._running)
        model = Denoiser(unet_fn, self.alphas_cumprod, self.cfg.prediction_type)
        extra = {"cond": self._unet_cond(cond.context, cond.pooled, n, h, w, scores[0]),
                 "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale, "schedule": sched}
        if self.cfg.unet.time_cond_proj_dim:  # LCM-distilled: the U-Net embeds w = guidance - 1, no uncond batch
            extra["cond"]["guidance"] = torch.full((cond.context.shape[0] * n,), guidance_scale - 1.0,
                                              device=self.device)
        elif guidance_scale > 1:
            extra["uncond"] = self._unet_cond(cond.uncond_context, cond.uncond_pooled, n, h, w, scores[1])
        if c_concat is not None:
            extra["c_concat"] = c_concat
        if blend is not None:
            model = _KeepKnown(model, *blend)
        with torch.inference_mode(), speed.on_device(self.unet, self.device, self.offload), \
                speed.heap_held(self.device):
            step_cb = None if callback is None else lambda d: callback(d["i"], d["sigma"], d["x"])
            return samplers.sample(sampler, model, x, sched, extra, callback=step_cb, generator=generator,
                                   disable=not progress, x0=x0, eta=eta)

    def decode(self, latents: torch.Tensor, params: dict | None = None, decoder: str = "vae") -> list[Image.Image]:
        """Latents (B, 4, h, w), as the sampler returns them -> PIL images. Latents larger than
        `tile_decode_above` on a side decode in overlapping tiles (the full decode's activations of a 2048 px
        image take tens of GB). A half-precision decode that overflows is redone in fp32 with a warning.
        decoder="taesd": the loaded TAESD decoder (load_preview) instead of the VAE, faster and coarser
        (latentdiff/fewstep.py)."""
        if decoder != "vae":
            fewstep.check_decoder(decoder, self.preview_decoder, self.source or self.cfg.name)
            self.preview_decoder.to(self.device)  # fp32, where the pipeline runs (on the CPU it would trail a GPU VAE)
            # its 64-channel full-size fp32 tensors (67 MB at 512 px) from the heap: 0.85 -> 0.45 s (speed.heap_held)
            with speed.heap_held(self.device):
                return self._with_params(self.preview(latents), params)
        z = latents.to(self.device) / self.cfg.vae.scaling_factor
        tiled = max(z.shape[-2:]) > self.tile_decode_above

        def run(vae, z):
            return (vae.tiled_decode(z) if tiled else vae.decode(z)).float()

        with torch.inference_mode(), self._running(self.vae), \
                speed.heap_mapped(self.device, trim_after=self.vae.decoder.stages()):
            img = run(self.vae, z.to(self.dtype))
            if self.dtype != torch.float32 and not torch.isfinite(img).all():
                # SDXL's VAE overflows in fp16 (diffusers' force_upcast, A1111's --no-half-vae)
                log.warning("%s VAE decode produced non-finite values; decoding again in fp32", self.dtype)
                speed.unpack_conv_weights(self.vae)
                img = run(self.vae.float(), z.float())
                self.vae.to(self.dtype)
        return self._with_params(to_pil(img), params)

    def _with_params(self, images: list[Image.Image], params: dict | None) -> list[Image.Image]:
        if params is not None:
            for im in images:
                im.info["parameters"] = format_parameters(params, self.source or self.cfg.name)
        return images

    # --- helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def _seed(seed):
        if seed is None:
            seed = random.randrange(2**32)
            log.info("seed=%d (drawn at random)", seed)
        return int(seed)

    def _check_args(self, steps, sampler, height, width, num_images, output, guidance_scale, timestep_spacing,
                    strength):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is unknown; allowed: {sorted(samplers.SAMPLERS)}")
        f = self.cfg.vae.downsample
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < f or v % 8 or v % f:
                raise ValueError(f"{name} must be a positive multiple of {max(8, f)}, got {v!r}")
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
        if output not in ("pil", "latent"):
            raise ValueError(f"output must be 'pil' or 'latent', got {output!r}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if timestep_spacing is not None and timestep_spacing not in schedules.SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {schedules.SPACINGS}, got {timestep_spacing!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")

    def _running(self, module: nn.Module):
        """The context a model runs in: on the device (see enable_offload), with packed convs unless exact."""
        stack = contextlib.ExitStack()
        stack.enter_context(speed.on_device(module, self.device, self.offload))
        stack.enter_context(speed.packed(module, self.device, self.exact, self.offload))
        return stack

    def compile(self) -> "Pipeline":
        """torch.compile the U-Net (inductor) with weight freezing: the weights become constants of the compiled
        code, so oneDNN gets them pre-packed. Opt-in: it pays a little per step for a minute of compiling during
        the first image (again for each new size or batch) and about twice the memory (benchmarks/README.md,
        "Pipeline.compile()"). Inference only; the compiled U-Net keeps the weights it was compiled with, so `to()`
        and `enable_offload()` drop it: call compile() again after them or after changing the weights."""
        speed.unpack_conv_weights(self.unet)  # inductor packs them itself
        self._compiled_unet = torch.compile(self.unet)
        return self

    def enable_offload(self) -> "Pipeline":
        """Keep the models on the CPU between uses (GPUs with little memory); see `speed.on_device`."""
        self._compiled_unet = None
        for m in (self.unet, self.vae):
            speed.unpack_conv_weights(m)
        self.offload = True
        for m in (self.unet, self.vae, self.text_encoders):
            m.to("cpu")
        return self

    def to(self, device=None, dtype=None) -> "Pipeline":
        speed.check_text_encoders(self.text_encoders, "to()")
        self.device = torch.device(device) if device is not None else self.device
        if dtype is not None:  # an explicit fp32 is the exact path, as in latentdiff.load()
            self.dtype, self.exact = dtype, dtype == torch.float32
        self._prompt_cache.clear()
        self._compiled_unet = None
        for m in (self.unet, self.vae, self.text_encoders):
            speed.unpack_conv_weights(m)
            m.to(self.device, self.dtype)
        return self

    def save(self, path, format: str = "single_file", dtype: torch.dtype | None = None) -> None:
        """Write a single `.safetensors` (original layout, config in its metadata) or a diffusers folder. A preview
        decoder goes next to a single file as `<name>.preview.safetensors` (a diffusers folder has no place for it)."""
        from . import weights

        speed.check_text_encoders(self.text_encoders, "save()")
        modules = {"unet": self.unet, "vae": self.vae, "text_encoders": self.text_encoders}
        if format == "single_file":
            weights.save_single_file(path, self.cfg, modules, dtype)
            if self.preview_decoder is not None:
                from .weights.preview import preview_path, save_preview

                save_preview(self.preview_decoder, preview_path(path))
        elif format == "diffusers":
            from .weights.folder import save_folder

            save_folder(path, self.cfg, modules, dtype)
        else:
            raise ValueError(f"format must be 'single_file' or 'diffusers', got {format!r}")


def _latents_given(image, z_channels: int) -> torch.Tensor | None:
    """image as latents: a (B, z, h, w) tensor with the VAE's latent channel count (not 3), else None."""
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == z_channels != 3:
        return image.float()
    return None


class _KeepKnown:
    """Inpainting with a regular checkpoint: the known region (mask 0) follows the noised source latents into
    the model and is restored in its prediction (ComfyUI's KSamplerX0Inpaint rule)."""

    def __init__(self, model, mask, x0, noise):
        self.model, self.mask, self.x0, self.noise = model, mask, x0, noise  # (B, 1, h, w), (B, 4, h, w) x2

    def __call__(self, x, sigma, **kw):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        x = x * self.mask + (self.x0 + self.noise * s) * (1 - self.mask)
        return self.model(x, sigma, **kw) * self.mask + self.x0 * (1 - self.mask)
