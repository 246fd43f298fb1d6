"""`latentdiff generate | convert | merge-lora | lora-info | eval | data`.

Training: `accelerate launch train.py`; benchmarks against diffusers: `python benchmarks/bench_vs_diffusers.py`, a
script of the repository since it imports diffusers."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from . import fewstep
from .speed import DTYPES

DEFAULTS = {"seed": 0, "schedule": "normal", "num_images": 1, "guidance_rescale": 0.0}


def _pipe(a, device):
    import latentdiff

    if a.random_preset:
        print(f"note: using the '{a.random_preset}' preset with RANDOM weights (no trained model given): "
              "the image is noise-like, this only exercises the pipeline", file=sys.stderr)
        pipe = latentdiff.from_config(a.random_preset, device=device, dtype=DTYPES[a.dtype] if a.dtype else None)
    else:
        pipe = latentdiff.load(a.model, device=device, dtype=DTYPES[a.dtype] if a.dtype else None,
                               prediction_type=a.prediction_type, config=a.config, vae=a.vae, lora_dir=a.lora_dir,
                               embeddings_dir=a.embeddings_dir)
        for spec in a.lora:
            path, weight = _lora_spec(spec, pipe.adapters.lora_dirs)
            pipe.load_lora(path, weight)
    if a.taesd:
        pipe.load_preview(a.taesd)
    if a.preset:  # fills what the command line leaves unset
        for arg, key in (("steps", "steps"), ("cfg", "guidance_scale"), ("sampler", "sampler"),
                         ("spacing", "timestep_spacing")):
            if getattr(a, arg) is None:
                setattr(a, arg, fewstep.preset_settings(a.preset, pipe.cfg)[key])
    return pipe


def _generate(a) -> None:
    from latentdiff.images import image_grid, read_png_parameters, save_png

    if a.prompts or a.out_dir:
        return _generate_many(a)
    pipe = _pipe(a, a.device or "cpu")
    kw = dict(prompt=a.prompt, guidance_scale=a.cfg, steps=a.steps, negative_prompt=a.negative, seed=a.seed,
              sampler=a.sampler, schedule=a.schedule, timestep_spacing=a.spacing, height=a.height, width=a.width,
              num_images=a.num_images, clip_skip=a.clip_skip, guidance_rescale=a.guidance_rescale, eta=a.eta)
    if a.from_png:  # the PNG's parameters fill every option not given on the command line
        given = {k: v for k, v in kw.items() if v is not None and v != DEFAULTS.get(k)}
        kw = {**kw, **read_png_parameters(a.from_png), **given}
    if not kw["prompt"]:
        raise ValueError("a prompt is required (or --from-png)")
    if a.refiner and (a.init_image or a.controlnet or a.decoder):
        raise ValueError("--refiner continues a plain text-to-image run; it does not take --init-image, "
                         "--controlnet or --decoder")
    kw.update(_control_kw(a))
    if a.decoder:
        kw["decoder"] = a.decoder
    if a.init_image:
        from PIL import Image

        image = Image.open(a.init_image)
        if a.mask:
            images = pipe.inpaint(image=image, mask=Image.open(a.mask), strength=a.strength or 1.0,
                                  progress=not a.quiet, **kw)
        else:
            images = pipe.img2img(image=image, strength=a.strength or 0.75, progress=not a.quiet, **kw)
    elif a.refiner:
        images = _refined(a, pipe, kw)
    else:
        images = pipe(progress=not a.quiet, **kw)
    if len(images) == 1:
        save_png(images[0], a.output)
    else:
        grid = image_grid(images)
        grid.info["parameters"] = images[0].info.get("parameters", "")
        save_png(grid, a.output)
    print(f"wrote {a.output} (seed {pipe.last_seed})")


def _refined(a, pipe, kw):
    """SDXL base + refiner (diffusers' ensemble of experts): the base stops at --refiner-switch of the noise
    schedule and hands its noisy latents to the refiner, which finishes them."""
    import latentdiff

    latents = pipe(progress=not a.quiet, denoising_end=a.refiner_switch, output="latent", **kw)
    refiner = latentdiff.load(a.refiner, device=a.device or "cpu", dtype=DTYPES[a.dtype] if a.dtype else None)
    del kw["height"], kw["width"]  # the latents' size
    return refiner.img2img(image=latents, denoising_start=a.refiner_switch, progress=not a.quiet, **kw)


def _control_kw(a) -> dict:
    """--controlnet FILE --control-image IMG [--control-scale S] [--canny] -> the pipeline's ControlNet keywords."""
    if (a.controlnet is None) != (a.control_image is None):
        raise ValueError("--controlnet FILE and --control-image IMG go together")
    if a.controlnet is None:
        if a.canny or a.control_scale is not None:
            raise ValueError("--canny / --control-scale need --controlnet FILE and --control-image IMG")
        return {}
    from PIL import Image

    import latentdiff
    from latentdiff.control import canny

    image = Image.open(a.control_image)
    image = canny(image) if a.canny else image.convert("RGB")
    scale = 1.0 if a.control_scale is None else a.control_scale
    return dict(controlnet=latentdiff.load_controlnet(a.controlnet), control_image=image, controlnet_scale=scale)


def _lora_spec(spec: str, dirs) -> tuple[str, float]:
    """NAME[:W] or PATH[:W] -> (file, weight); a name is looked up as <lora:NAME> tags are."""
    from pathlib import Path

    from latentdiff.adapters.tags import find

    name, sep, weight = spec.rpartition(":")
    try:
        w = float(weight) if sep else 1.0
    except ValueError:
        name, w = spec, 1.0  # no weight given, and the name itself holds a ":"
    return str(Path(name) if Path(name).is_file() else find(name, list(dirs))), w


def _merge_lora(a) -> None:
    """kohya's merge script: the LoRAs merged into the base model's weights, saved as a new single file."""
    from pathlib import Path

    import latentdiff

    if Path(a.output).resolve() == Path(a.base).resolve():
        raise ValueError(f"-o {a.output} is the base model itself; write the merged model to a new file")
    pipe = latentdiff.load(a.base, dtype=torch.float32)  # merge in fp32, save in --dtype
    for spec in a.loras:
        path, weight = _lora_spec(spec, [Path(a.base).parent / "loras"])
        pipe.load_lora(path, weight)
    pipe.save(a.output, dtype=DTYPES[a.dtype])
    print(f"wrote {a.output} (" + ", ".join(f"{n} x{u}" for n, (_, u) in pipe.loras.items()) + f", {a.dtype})")


def _lora_info(a) -> None:
    import json

    from latentdiff.adapters.lora import lora_info

    print(json.dumps(lora_info(a.file), indent=2, default=str))


def _generate_many(a) -> None:
    """--prompts FILE --out-dir DIR, on every process of an accelerate launch (latentdiff/batch.py)."""
    from latentdiff import batch

    if not (a.prompts and a.out_dir):
        raise ValueError("--prompts FILE and --out-dir DIR go together")
    if a.prompt or a.from_png or a.init_image or a.mask:
        raise ValueError("--prompts takes its prompts from the file: no prompt argument, --from-png, "
                         "--init-image or --mask with it")
    if a.decoder:
        raise ValueError("--decoder is for single images; --prompts decodes with the VAE")
    state = batch.process_state(a.device)
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # model notes once, not once per process
    try:
        if state.device.type == "cpu":
            batch.cpu_threads()
        s = batch.generate_many(_pipe(a, state.device), a.prompts, a.out_dir, base_seed=a.seed,
                                progress=not a.quiet, negative_prompt=a.negative, steps=a.steps,
                                guidance_scale=a.cfg, sampler=a.sampler, schedule=a.schedule, timestep_spacing=a.spacing,
                                height=a.height, width=a.width,
                                num_images=a.num_images, clip_skip=a.clip_skip,
                                guidance_rescale=a.guidance_rescale, eta=a.eta)
    except batch.BatchError as e:  # e.g. the main process could not create the folder
        raise ValueError(str(e)) from e
    finally:
        state.destroy_process_group()  # else a gloo rank can abort at exit and hang the others
    if state.is_main_process:
        print(batch.format_summary(s, a.out_dir))
    if s["failures"]:
        sys.exit(f"error: {s['failures']} job(s) failed; their errors are in {a.out_dir}/manifest.jsonl"
                 if state.is_main_process else 1)


def _convert(a) -> None:
    import latentdiff

    pipe = latentdiff.load(a.input, dtype=DTYPES[a.dtype], prediction_type=a.prediction_type, config=a.config)
    pipe.save(a.output, format=a.to, dtype=DTYPES[a.dtype])
    print(f"wrote {a.output} ({a.to}, {a.dtype})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="latentdiff", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--prompts", default=None, help="a .txt (one prompt a line) or .jsonl (one job a line) file: "
                   "one PNG per image in --out-dir, split between accelerate's processes, resumable; the options "
                   "below are every job's defaults, --seed its base seed (job i: seed + i)")
    g.add_argument("--out-dir", default=None, help="with --prompts: the images and manifest.jsonl")
    g.add_argument("--from-png", default=None, help="re-create an image from its PNG 'parameters' chunk")
    g.add_argument("--init-image", default=None, help="img2img / inpaint source image")
    g.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    g.add_argument("--strength", type=float, default=None, help="img2img 0.75, inpaint 1.0 by default")
    g.add_argument("--guidance-rescale", type=float, default=0.0)
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("-m", "--model", default=None, help="single file, diffusers folder or shipped model name")
    g.add_argument("--random-preset", default=None, help="use a preset with random weights (pipeline smoke test)")
    g.add_argument("--config", default=None, help="preset name or YAML overriding detection")
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None)
    g.add_argument("-n", "--negative", default=None, help="negative prompt")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--cfg", type=float, default=None, help="guidance scale")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", default=None)
    g.add_argument("--eta", type=float, default=None,
                   help="noise of ddim (0), tcd (0.3), euler_a / dpmpp_2s_a / dpmpp_sde (1): each one's default if unset")
    g.add_argument("--schedule", default="normal", choices=["normal", "karras", "exponential"])
    g.add_argument("--spacing", default=None, choices=["linspace", "leading", "trailing"])
    g.add_argument("-H", "--height", type=int, default=None)
    g.add_argument("-W", "--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--clip-skip", type=int, default=None)
    g.add_argument("--device", default=None, help="default cpu; with --prompts, accelerate's device per process")
    g.add_argument("--dtype", choices=list(DTYPES), default=None)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--vae", default=None, help="standalone VAE file or diffusers vae/ folder")
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:W]",
                   help="merge a LoRA (file or name in --lora-dir) for this run; repeatable")
    g.add_argument("--lora-dir", default=None, help="where <lora:NAME:W> prompt tags look (default: loras/)")
    g.add_argument("--embeddings-dir", default=None, help="textual-inversion files usable by name in prompts")
    g.add_argument("--refiner", default=None, help="SDXL refiner model finishing the base model's image")
    g.add_argument("--refiner-switch", type=float, default=0.8,
                   help="fraction of the noise schedule the base runs before the refiner takes over")
    g.add_argument("--controlnet", default=None, help="ControlNet file or diffusers folder (original or diffusers "
                   "layout)")
    g.add_argument("--control-image", default=None, help="the ControlNet's map (or, with --canny, the photo)")
    g.add_argument("--control-scale", type=float, default=None, help="ControlNet strength (default 1.0)")
    g.add_argument("--canny", action="store_true", help="make the control image a Canny edge map (low 100, "
                   "high 200; needs opencv-python-headless: pip install 'latentdiff[control]')")
    g.add_argument("--preset", choices=sorted(fewstep.SETTINGS), default=None,
                   help="few-step settings (steps, --cfg, --sampler, --spacing; those given still win): lcm = LCM / "
                        "LCM-LoRA / TCD models, turbo = SD(XL)-Turbo, lightning = SDXL-Lightning 4-step, hyper = "
                        "Hyper-SD 8-step LoRAs")
    g.add_argument("--decoder", choices=["vae", "taesd"], default=None,
                   help="taesd: decode the final image with a TAESD decoder (--taesd FILE), faster, coarser")
    g.add_argument("--taesd", default=None, metavar="FILE",
                   help="taesd_decoder.safetensors (SD 1.x / 2.x) or taesdxl_decoder.safetensors (SDXL)")
    g.set_defaults(func=_generate)

    m = sub.add_parser("merge-lora", help="merge LoRAs into a model: merge-lora BASE LORA[:W] ... -o OUT")
    m.add_argument("base")
    m.add_argument("loras", nargs="+", metavar="LORA[:W]")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    m.set_defaults(func=_merge_lora)

    i = sub.add_parser("lora-info", help="format, target model, ranks, alphas and training metadata of a LoRA")
    i.add_argument("file")
    i.set_defaults(func=_lora_info)

    c = sub.add_parser("convert", help="single file <-> diffusers folder, change dtype")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", choices=["single_file", "diffusers"], default="single_file")
    c.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    c.add_argument("--config", default=None)
    c.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None)
    c.set_defaults(func=_convert)

    e = sub.add_parser("eval", add_help=False,
                       help="evaluate the shipped models: eval shapes | emoji [options] | "
                            "eval vae [--model emoji|shapes]")
    e.add_argument("args", nargs=argparse.REMAINDER)
    e.set_defaults(func=lambda a: __import__("latentdiff.evaluate", fromlist=["main"]).main(a.args))

    d = sub.add_parser("data", help="rebuild a vendored dataset: data build emoji")
    d.add_argument("action", choices=["build"])
    d.add_argument("name", choices=["emoji"])
    d.set_defaults(func=lambda a: print(f"wrote {__import__('latentdiff.datasets', fromlist=['build']).build(a.name)}"))

    a, unknown = p.parse_known_args(argv)
    if a.command == "eval":  # it parses its own options; a leading one ("eval -h") lands here
        a.args = unknown + a.args
    elif unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        a.func(a)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
