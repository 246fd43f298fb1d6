"""ControlNet at generation time: control images (preprocessors, resizing as diffusers does) and the U-Net
function that adds the ControlNets' residuals, inside the window of steps each one acts in.

    hint (B, 3, H, W) in [0, 1] --ControlNet(x_in, t, context, y)--> residuals r_n (one per skip) and r_mid
    U-Net skips s_n += scale * r_n, middle-block output += scale * r_mid; several ControlNets: residuals summed

Semantics follow diffusers' StableDiffusion(XL)ControlNetPipeline: a ControlNet acts at step i of N when not
(i / N < start or (i + 1) / N > end); guess mode (original gradio_canny.py "guess mode", A1111's "ControlNet is
more important") scales residual k of n by scale * logspace(-1, 0, n + 1)[k] and feeds the ControlNet the
conditional half of the CFG batch only (zeros for the unconditional half). With two-evaluation samplers (heun,
dpm2) a step's midpoint counts as that step (diffusers counts its doubled timesteps instead).

Preprocessors: `canny` (OpenCV, the optional extra `latentdiff[control]`) and pass-through for maps made
elsewhere (pose, depth, scribble, ...: pass the image itself). Other annotators are out of scope.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .models.controlnet import ControlNet
from .weights.controlnet import describe

CANNY_LOW, CANNY_HIGH = 100, 200  # lllyasviel's gradio_canny.py defaults


def canny(image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """Canny edge map of `image` (PIL or HxWx3 uint8 array) as a 3-channel PIL image (white edges on black), as
    lllyasviel's annotator: cv2.Canny(img, low, high), then HWC3."""
    try:
        import cv2
    except ImportError:
        raise ImportError("the canny preprocessor needs OpenCV: pip install 'latentdiff[control]' "
                          "(opencv-python-headless)") from None
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    edges = cv2.Canny(arr, low, high)  # (H, W) uint8 in {0, 255}
    out = Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
    out.info["controlnet_module"] = ("canny", low, high)  # for the PNG parameters (Control.infotext)
    return out


def _hint_tensor(image, name: str) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float in [0, 1]; a tensor (3, H, W) / (B, 3, H, W) is taken as [0, 1] (diffusers'
    control image convention, cldm's detected_map / 255)."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if isinstance(image, torch.Tensor):
        t = image.float()[None] if image.ndim == 3 else image.float()
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} tensor must be (3, H, W) or (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        return t
    raise ValueError(f"{name} must be a PIL image or a torch tensor, got {type(image).__name__}")


def _size(image) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])


def _per_net(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} ControlNets")
    return values


class Control:
    """One call's ControlNets with their images, scales and step windows; validated on construction, before
    anything runs or changes."""

    def __init__(self, unet_cfg, controlnet, image, scale=1.0, start=0.0, end=1.0, guess_mode=False):
        self.nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        n = len(self.nets)
        if image is None:
            raise ValueError("controlnet given without control_image")
        self.images = _per_net(image, n, "control_image") if n > 1 or isinstance(image, (list, tuple)) else [image]
        self.scales = [float(s) for s in _per_net(scale, n, "controlnet_scale")]
        self.starts = [float(s) for s in _per_net(start, n, "control_start")]
        self.ends = [float(e) for e in _per_net(end, n, "control_end")]
        self.guess_mode = bool(guess_mode)
        for k, (s, e) in enumerate(zip(self.starts, self.ends)):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control_start / control_end of ControlNet {k} must satisfy 0 <= start < end <= 1, "
                                 f"got {s}, {e}")
        for k, net in enumerate(self.nets):
            self._check_fits(net, unet_cfg, k)
        self.hints: list[torch.Tensor] = []

    @staticmethod
    def _check_fits(net, u, k: int) -> None:
        if not isinstance(net, ControlNet):
            raise ValueError(f"controlnet {k} is a {type(net).__name__}, not a latentdiff ControlNet "
                             "(latentdiff.load_controlnet(path))")
        e = net.cfg.unet
        fields = ("context_dim", "adm_in_channels", "model_channels", "channel_mult", "num_res_blocks", "middle_block")
        bad = [f"{f} {getattr(e, f)} vs {getattr(u, f)}" for f in fields if getattr(e, f) != getattr(u, f)]
        if bad:
            raise ValueError(f"ControlNet {k} ({getattr(net, 'source', 'unnamed')}) is for {describe(e)}, this "
                             f"pipeline's U-Net is {describe(u)}: {'; '.join(bad)}")

    def default_size(self, f: int) -> tuple[int, int]:
        """Output (height, width) when none is given: the first control image's size, rounded down to multiples
        of the VAE factor f (diffusers' get_default_height_width)."""
        h, w = _size(self.images[0])
        return h - h % f, w - w % f

    def prepare(self, height: int, width: int, prompts: int, num_images: int, f: int) -> None:
        """Resize each control image to (height, width) as diffusers' control image processor does (PIL: Lanczos;
        tensors: nearest) and batch it (B = prompts * num_images). A control image whose aspect ratio differs
        from the output's by more than one latent pixel and 1% is refused: it would be stretched."""
        self.hints = []
        for k, image in enumerate(self.images):
            ch, cw = _size(image)
            off = abs(cw * height / ch - width)
            if off > f and abs((cw / ch) / (width / height) - 1) > 0.01:
                raise ValueError(f"control_image {k} is {cw}x{ch} (width x height, ratio {cw / ch:.3f}), the "
                                 f"output {width}x{height} (ratio {width / height:.3f}): it would be stretched; crop "
                                 "it to the output's ratio or pass a height and width of its ratio")
            if isinstance(image, Image.Image):
                image = image.convert("RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), resample=Image.LANCZOS)
            t = _hint_tensor(image, f"control_image {k}")
            if t.shape[-2:] != (height, width):
                t = torch.nn.functional.interpolate(t, size=(height, width))  # nearest, as diffusers
            if t.shape[0] == prompts:
                t = t.repeat_interleave(num_images, 0)  # one map per prompt, like the prompts' images
            elif t.shape[0] != 1:
                raise ValueError(f"control_image {k} has a batch of {t.shape[0]}; give 1 or one per prompt "
                                 f"({prompts})")
            self.hints.append(t.expand(prompts * num_images, -1, -1, -1))

    def unet_fn(self, unet_fn, schedule, cfg_batch: bool, device, dtype, running):
        """Wrap `unet_fn(x, t, context, y=None, control=None)` so each call adds the ControlNets' residuals.
        cfg_batch: the batch is [uncond, cond] (guidance on). running(module): the context a module runs in
        (device placement, conv packing)."""
        for net in self.nets:
            p = next(net.parameters())
            if p.device != torch.device(device) or p.dtype != dtype:
                from . import speed

                speed.unpack_conv_weights(net)
                net.to(device, dtype)
        hints = [h.to(device, dtype) for h in self.hints]
        timesteps, n_steps = schedule.timesteps, len(schedule)

        def fn(x, t, context, y=None, **kw):  # kw: guidance (LCM-distilled U-Nets), passed on
            # step index: timesteps descend; a midpoint between steps i and i+1 counts as step i
            i = max(int((timesteps.to(t.device) >= t[0]).sum()) - 1, 0)
            down = mid = None
            for net, hint, scale, s, e in zip(self.nets, hints, self.scales, self.starts, self.ends):
                if i / n_steps < s or (i + 1) / n_steps > e or scale == 0:
                    continue
                r_down, r_mid = self._residuals(net, hint, scale, x, t, context, y, cfg_batch, dtype, running)
                if down is None:
                    down, mid = r_down, r_mid
                else:
                    down = [a + b for a, b in zip(down, r_down)]
                    mid = None if mid is None else mid + r_mid
            return unet_fn(x, t, context, y, **kw) if down is None else unet_fn(x, t, context, y, control=(down, mid),
                                                                                 **kw)

        return fn

    def _residuals(self, net, hint, scale, x, t, context, y, cfg_batch, dtype, running):
        x = x[:, :net.cfg.unet.in_channels]  # a 9-channel inpainting U-Net's ControlNet sees the latents only
        half = x.shape[0] // 2 if self.guess_mode and cfg_batch else 0  # guess mode: the conditional half only
        with running(net):
            down, mid = net(x[half:].to(dtype), t[half:], context[half:], None if y is None else y[half:],
                            hint if half or not cfg_batch else torch.cat([hint, hint]))
        if self.guess_mode:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * scale  # 0.1 .. 1.0, diffusers
            down = [r * s for r, s in zip(down, scales)]
            mid = None if mid is None else mid * scales[-1]
        else:
            down = [r * scale for r in down]
            mid = None if mid is None else mid * scale
        if half:
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = None if mid is None else torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def infotext(self) -> list[str]:
        """A1111 ControlNet extension entries (`ControlNet 0: "Module: ..., Model: ..., ..."`), one per net."""
        out = []
        for k, (net, image) in enumerate(zip(self.nets, self.images)):
            module = image.info.get("controlnet_module", ("none",)) if isinstance(image, Image.Image) else ("none",)
            fields = [("Module", module[0]), ("Model", _stem(getattr(net, "source", None) or "controlnet")),
                      ("Weight", self.scales[k]), ("Resize Mode", "Just Resize")]
            if module[0] == "canny":
                fields += [("Threshold A", module[1]), ("Threshold B", module[2])]
            fields += [("Guidance Start", self.starts[k]), ("Guidance End", self.ends[k]), ("Pixel Perfect", False),
                       ("Control Mode", "ControlNet is more important" if self.guess_mode else "Balanced")]
            out.append(", ".join(f"{a}: {b}" for a, b in fields))
        return out


def _stem(name: str) -> str:
    for suffix in (".safetensors", ".pth", ".ckpt", ".pt", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
