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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import nn

from . import speed
from .config import ModelConfig
from .models.text import Tokenizer
from .models.unet import sdxl_vector
from .params import format_parameters
from .prompt import encode_prompts
from .sampling import samplers, schedules
from .sampling.denoiser import Denoiser

log = logging.getLogger("latentdiff")


@dataclass
class Conditioning:
    context: torch.Tensor  # (B, 77k, D)
    pooled: torch.Tensor | None  # (B, P) for SDXL, else None


class Pipeline:
    def __init__(self, cfg: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoders: nn.ModuleList,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, source: str | None = None,
                 exact: bool | None = None):
        self.cfg, self.unet, self.vae, self.text_encoders = cfg, unet, vae, text_encoders
        self.tokenizer = Tokenizer()
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        # exact: never prepack conv weights (see _packed), so fp32 is bit for bit diffusers' fp32.
        # None = exact in fp32; latentdiff.load() passes False for its default dtype, True for an explicit fp32.
        self.exact = dtype == torch.float32 if exact is None else exact
        for m in (unet, vae, text_encoders):
            m.eval().requires_grad_(False)
        self.alphas_cumprod = schedules.model_alphas_cumprod(cfg)
        self.offload = False  # see enable_offload()
        self.tile_decode_above = 128  # latent side above which decode() tiles (1024 px for SD)
        self._prompt_cache: dict[tuple, tuple[Conditioning, Conditioning]] = {}  # repeated prompts: encode once
        self._compiled_unet = None  # see compile()
        self.preview_decoder = None  # see load_preview() / preview()

    # --- conditioning -------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      clip_skip: int | None = None) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for a prompt (or list) and its negative. Long prompts become 77k tokens, emphasis
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
        with torch.inference_mode(), self._on_device(self.text_encoders):
            c, cp, u, up = encode_prompts(self.tokenizer, list(self.text_encoders), prompts, negatives,
                                          clip_skip=clip_skip)
        if self.cfg.family == "sdxl" and negative_prompt is None:
            u, up = torch.zeros_like(u), torch.zeros_like(up)
        if len(self._prompt_cache) >= 16:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        self._prompt_cache[key] = Conditioning(c, cp), Conditioning(u, up)
        return self._prompt_cache[key]

    def _unet_cond(self, c: Conditioning, n: int, h: int, w: int) -> dict:
        """Conditioning dict for the denoiser, each prompt repeated n times: prompts p0 p0 p1 p1 (diffusers' order)."""
        out = {"context": c.context.repeat_interleave(n, 0).to(self.device, self.dtype)}
        if self.cfg.unet.adm_in_channels:
            # SDXL size conditioning for plain text-to-image: original = target = (H, W), crop (0, 0)
            size = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(c.pooled.shape[0], 6)
            y = sdxl_vector(c.pooled.float(), size, self.cfg.unet.adm_in_channels)
            out["y"] = y.repeat_interleave(n, 0).to(self.device, self.dtype)
        return out

    def _unet_fn(self, x, t, context, y=None):
        # Latents stay fp32 in the sampler; the U-Net runs in the pipeline dtype.
        if self._compiled_unet is None:
            with self._packed(self.unet):
                return self.unet(x.to(self.dtype), t.to(x.device), context, y).float()
        # inductor reads `freezing` from its global config when it compiles (first call, each new shape):
        # torch.compile(..., options={"freezing": True}) was measured not to freeze (slower than eager)
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self._compiled_unet(x.to(self.dtype), t.to(x.device), context, y).float()

    # --- generation ---------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], guidance_scale: float | None = None, steps: int | None = None,
                 negative_prompt: str | list[str] | None = None, seed: int | None = 0, sampler: str | None = None,
                 schedule: str = "normal", timestep_spacing: str | None = None, height: int | None = None,
                 width: int | None = None, num_images: int = 1, output: str = "pil",
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback=None, progress: bool = True):
        """Text to image. Returns a list of PIL images, or the final latents (B, 4, H/f, W/f), not divided by
        the VAE scaling factor, with output="latent". callback(step, sigma, latents) runs after every step."""
        return self._generate(prompt, None, None, 1.0, guidance_scale, steps, negative_prompt, seed, sampler,
                              schedule, timestep_spacing, height, width, num_images, output, guidance_rescale,
                              clip_skip, callback, progress)

    def img2img(self, prompt: str | list[str], image, strength: float = 0.75, **kw):
        """Image to image with diffusers' strength semantics: the image is encoded (posterior sample from the
        seed's generator), noised to the first of the last int(steps * strength) steps, and sampled from there.
        `image`: PIL image or tensor (3, H, W) / (B, 3, H, W) in [-1, 1]; its size is the output size unless
        height / width are given. Other arguments as in __call__."""
        return self._generate(prompt, image, None, strength, **_named(kw))

    def inpaint(self, prompt: str | list[str], image, mask, strength: float = 1.0, **kw):
        """Repaint where `mask` is white (1), keep where it is black (0).

        9-channel inpainting checkpoints get (mask, masked-image latent) concatenated to the U-Net input, as in
        diffusers' StableDiffusionInpaintPipeline. Regular checkpoints blend the known region back at every
        model call (ComfyUI's rule: x = x*m + (x0 + sigma*noise)*(1-m) before, x0 restored after), so the kept
        pixels come back exactly up to the VAE round trip."""
        return self._generate(prompt, image, mask, strength, **_named(kw))

    def _generate(self, prompt, image, mask, strength, guidance_scale=None, steps=None, negative_prompt=None,
                  seed=0, sampler=None, schedule="normal", timestep_spacing=None, height=None, width=None,
                  num_images=1, output="pil", guidance_rescale=0.0, clip_skip=None, callback=None, progress=True):
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        steps = self.cfg.steps if steps is None else steps
        sampler = sampler or self.cfg.sampler
        if image is not None:
            image = _image_tensor(image, "image")  # (1 or B, 3, H, W) in [-1, 1]
            height, width = height or image.shape[-2], width or image.shape[-1]
        height, width = height or self.cfg.size, width or self.cfg.size
        self._check_args(steps=steps, sampler=sampler, height=height, width=width, num_images=num_images,
                         output=output, guidance_scale=guidance_scale, timestep_spacing=timestep_spacing)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        seed = self._seed(seed)
        timestep_spacing = timestep_spacing or self.cfg.timestep_spacing
        cond, uncond = self.encode_prompt(prompt, negative_prompt, clip_skip)
        B = cond.context.shape[0] * num_images
        f = self.cfg.vae.downsample
        shape = (B, self.cfg.unet.out_channels, height // f, width // f)
        generator = torch.Generator("cpu").manual_seed(seed)
        sched = schedules.get_sigmas(sampler, steps, schedule, timestep_spacing, alphas_cumprod=self.alphas_cumprod)
        start = schedules.strength_start(steps, strength)
        if start >= steps:
            raise ValueError(f"strength={strength} with steps={steps} leaves no step to run; raise either")
        sched = sched[start:]
        x0 = c_concat = blend = None
        inpaint9 = self.cfg.unet.in_channels == self.cfg.unet.out_channels + 5
        if inpaint9 and mask is None:
            raise ValueError("this is an inpainting checkpoint (9 input channels): use pipe.inpaint(prompt, image, "
                             "mask)")
        if mask is not None:
            m = _image_tensor(mask, "mask", gray=True)  # (1 or B, 1, Hm, Wm) in [0, 1]
            if m.shape[-2:] != image.shape[-2:]:
                raise ValueError(f"mask size {tuple(m.shape[-2:])[::-1]} differs from the image size "
                                 f"{tuple(image.shape[-2:])[::-1]} (width x height); they must be equal")
            m = (_resize(m, height, width) >= 0.5).float().expand(B, -1, -1, -1)  # binarised as diffusers
            m_lat = F.interpolate(m, size=shape[-2:])  # (B, 1, h, w), nearest
        if image is not None:
            image = _resize(image, height, width).expand(B, -1, -1, -1)
        # generator draws, in diffusers' order: [image posterior], noise, [masked-image posterior]
        if image is not None and (mask is None or start > 0 or not inpaint9):
            x0 = self._encode_image(image, generator)
        noise = torch.randn(shape, generator=generator).to(self.device)
        if mask is not None and inpaint9:
            masked = self._encode_image(image * (m < 0.5), generator)
            c_concat = torch.cat([m_lat.to(self.device), masked], 1)  # (B, 5, h, w)
        elif mask is not None:
            blend = (m_lat.to(self.device), x0, noise)
        x0_start = None if mask is not None and start == 0 else x0  # inpaint at strength 1: pure noise, as diffusers
        latents = self._sample(sampler, noise, sched, cond, uncond, num_images, height, width, guidance_scale,
                               guidance_rescale, generator, callback, progress, c_concat, x0_start, blend)
        self.last_seed = seed
        if output == "latent":
            return latents
        params = dict(prompt=prompt, negative_prompt=negative_prompt or "", steps=steps, sampler=sampler,
                      schedule=schedule, guidance_scale=guidance_scale, seed=seed, height=height, width=width)
        if image is not None:
            params["strength"] = strength
        return self.decode(latents, params)

    def _encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w), a posterior sample as diffusers draws it."""
        with torch.inference_mode(), self._on_device(self.vae), self._packed(self.vae):
            post = self.vae.encode(image.to(self.device, self.dtype))
            return post.sample(generator).float() * self.cfg.vae.scaling_factor

    def _sample(self, sampler, x, sched, cond, uncond, n, h, w, guidance_scale, guidance_rescale, generator,
                callback, progress, c_concat=None, x0=None, blend=None):
        model = Denoiser(self._unet_fn, self.alphas_cumprod, self.cfg.prediction_type)
        extra = {"cond": self._unet_cond(cond, n, h, w), "guidance_scale": guidance_scale,
                 "guidance_rescale": guidance_rescale, "schedule": sched}
        if guidance_scale > 1:
            extra["uncond"] = self._unet_cond(uncond, n, h, w)
        if c_concat is not None:
            extra["c_concat"] = c_concat
        if blend is not None:
            model = _KeepKnown(model, *blend)
        with torch.inference_mode(), self._on_device(self.unet):
            step_cb = None if callback is None else lambda d: callback(d["i"], d["sigma"], d["x"])
            return samplers.sample(sampler, model, x, sched, extra, callback=step_cb, generator=generator,
                                   disable=not progress, x0=x0)

    def decode(self, latents: torch.Tensor, params: dict | None = None) -> list[Image.Image]:
        """Latents (B, 4, h, w), as the sampler returns them -> PIL images. Latents larger than
        `tile_decode_above` on a side decode in overlapping tiles (the full decode's activations of a 2048 px
        image take tens of GB). An fp16 decode that overflows to NaN is redone in fp32 with a warning."""
        z = latents.to(self.device) / self.cfg.vae.scaling_factor
        tiled = max(z.shape[-2:]) > self.tile_decode_above

        def run(vae, z):
            return (vae.tiled_decode(z) if tiled else vae.decode(z)).float()

        with torch.inference_mode(), self._on_device(self.vae), self._packed(self.vae):
            img = run(self.vae, z.to(self.dtype))
            if torch.isnan(img).any() and self.dtype == torch.float16:
                log.warning("fp16 VAE decode produced NaN; decoding again in fp32")
                img = run(self.vae.float(), z.float())
                self.vae.to(self.dtype)
        images = _to_pil(img)
        if params is not None:
            for im in images:
                im.info["parameters"] = format_parameters(params, self.source or self.cfg.name)
        return images

    def load_preview(self, path) -> None:
        """Read a preview decoder: ours, written by `python -m latentdiff.train.preview` (latentdiff.load() does
        this on its own for `<model>.preview.safetensors` next to the model file), or a released TAESD decoder
        (`taesd_decoder.safetensors` for SD 1.x / 2.x, `taesdxl_decoder.safetensors` for SDXL)."""
        from .weights.preview import read_preview
        from .weights import CheckpointError

        model = read_preview(path)
        if model.latent_channels != self.cfg.vae.z_channels:
            raise CheckpointError(f"{path}: preview decoder for {model.latent_channels} latent channels, this "
                                  f"model's VAE has {self.cfg.vae.z_channels}")
        self.preview_decoder = model

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 4, h, w) as the sampler holds them (e.g. in a callback) -> rough PIL images, from the tiny
        preview decoder instead of the VAE (shipped emoji model: see checkpoints/emoji.md for its PSNR and cost)."""
        if self.preview_decoder is None:
            raise RuntimeError(f"{self.source or self.cfg.name} has no preview decoder: train one with "
                               "`python -m latentdiff.train.preview` or take a released TAESD decoder "
                               "(taesd_decoder.safetensors), and call pipe.load_preview(path)")
        with torch.inference_mode():
            return _to_pil(self.preview_decoder(latents.detach().float().cpu()))

    # --- helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def _seed(seed):
        if seed is None:
            seed = random.randrange(2**32)
            log.info("seed=%d (drawn at random)", seed)
        return int(seed)

    def _check_args(self, steps, sampler, height, width, num_images, output, guidance_scale, timestep_spacing):
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

    @contextlib.contextmanager
    def _on_device(self, module: nn.Module):
        """With `offload` set, a model lives on the CPU and visits the device only while it runs (text encoders,
        then U-Net, then VAE): peak device memory is the largest model instead of all three."""
        if not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    @contextlib.contextmanager
    def _packed(self, module: nn.Module):
        """On the CPU, unless exact, run `module` with prepacked conv weights (speed.pack_conv_weights; SD 1.5 at
        256 x 256: bf16 on AVX512-BF16, a guided step 1.7 -> 1.1 s, the VAE decode 2.0-2.7 -> 1.6 s; fp32 on an
        AVX2-only CPU, one U-Net call 5.5 -> 3.1 s). Its first run packs, then returns the freed plain weights'
        memory to the OS."""
        first = (self.device.type == "cpu" and not self.exact and not self.offload
                 and speed.pack_conv_weights(module))
        yield
        if first:
            speed.release_freed_memory()

    def compile(self) -> "Pipeline":
        """torch.compile the U-Net (inductor) with weight freezing: the weights become constants of the compiled
        code, so oneDNN gets them pre-packed. Measured on the 2-core AVX-512-bf16 CPU, SD 1.5, bf16, 256x256,
        8 Euler a steps at CFG 7.5 (benchmarks/bench_vs_diffusers.py --compile): 1.02-1.07 s per step against
        ~1.2 s eager with packed convs (~1.3 s plain), after 58-68 s of compiling during the first image (and again
        for each new size or batch), and peak RSS 5.6 GB against ~3 GB (the compiler, and the frozen weights next
        to the module's own). Inference only; the compiled U-Net keeps the weights it was compiled with, so `to()`
        and `enable_offload()` drop it: call compile() again after them or after changing the weights."""
        speed.unpack_conv_weights(self.unet)  # inductor packs them itself
        self._compiled_unet = torch.compile(self.unet)
        return self

    def enable_offload(self) -> "Pipeline":
        """Keep the models on the CPU between uses (GPUs with little memory); see `_on_device`."""
        self._compiled_unet = None
        for m in (self.unet, self.vae):
            speed.unpack_conv_weights(m)
        self.offload = True
        for m in (self.unet, self.vae, self.text_encoders):
            m.to("cpu")
        return self

    def to(self, device=None, dtype=None) -> "Pipeline":
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


class _KeepKnown:
    """Inpainting with a regular checkpoint: the known region (mask 0) follows the noised source latents into
    the model and is restored in its prediction (ComfyUI's KSamplerX0Inpaint rule)."""

    def __init__(self, model, mask, x0, noise):
        self.model, self.mask, self.x0, self.noise = model, mask, x0, noise  # (B, 1, h, w), (B, 4, h, w) x2

    def __call__(self, x, sigma, **kw):
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        x = x * self.mask + (self.x0 + self.noise * s) * (1 - self.mask)
        return self.model(x, sigma, **kw) * self.mask + self.x0 * (1 - self.mask)


def _named(kw: dict) -> dict:
    allowed = {"guidance_scale", "steps", "negative_prompt", "seed", "sampler", "schedule", "timestep_spacing",
               "height", "width", "num_images", "output", "guidance_rescale", "clip_skip", "callback", "progress"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"unexpected argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return kw


def _image_tensor(image, name: str, gray: bool = False) -> torch.Tensor:
    """PIL image or tensor -> float (B, C, H, W); RGB in [-1, 1], or a gray mask in [0, 1]."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)
        t = t[None, None] if gray else t.permute(2, 0, 1)[None]
        return t if gray else t * 2 - 1
    if isinstance(image, torch.Tensor):
        t = image.float()
        t = t[None] if t.ndim == 3 else t[None, None] if t.ndim == 2 else t
        if t.ndim != 4 or t.shape[1] != (1 if gray else 3):
            raise ValueError(f"{name} tensor must be ({'1' if gray else '3'}, H, W) or (B, C, H, W), "
                             f"got {tuple(image.shape)}")
        return t
    raise ValueError(f"{name} must be a PIL image or a torch tensor, got {type(image).__name__}")


def _resize(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return t if t.shape[-2:] == (h, w) else F.interpolate(t, size=(h, w), mode="bilinear", antialias=True)


def save_png(image: Image.Image, path: str | Path) -> None:
    """Save with the A1111 `parameters` text chunk, if the image carries one."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    image.save(path, pnginfo=info)


def _to_pil(img: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> uint8 PIL images."""
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
