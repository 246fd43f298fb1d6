"""Few-step generation (issue #27): time per 512 px image of SD 1.5 size in latentdiff and in diffusers, in the same
run, for LCM 4 steps with the VAE decode, LCM 4 steps with a TAESD decode, and 1-step Turbo-style (euler_a,
trailing, guidance 0), then the ratios latentdiff / diffusers and, for the TAESD path, image time / U-Net time.

    python benchmarks/bench_fewstep.py [--size 512] [--repeats 2] [--ours-dtype auto] [--diffusers-dtype fp32]

The model is bench_vs_diffusers.py's random SD 1.5 (fp16 single file and the same weights as a diffusers folder,
written once to its cache, shared with bench_lora.py); the TAESD decoder is diffusers' AutoencoderTiny with its
seeded default init (latentdiff reads its decoder in TAESD's released layout). Guidance 1 for LCM (LCM-LoRA's
setting: no CFG pass), 0 for Turbo. Both libraries are loaded in one process and make two untimed 1-step warm-up
images each (VAE and TAESD decode); then, in rounds, every configuration runs in latentdiff and right after in
diffusers, so the drift of a shared, noisy machine hits both alike. Medians of the rounds; compare ratios from the
same run only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_diffusers import CACHE, PROMPT, UNetTimer, setup  # noqa: E402

CONFIGS = {  # name -> (sampler, steps, guidance, spacing, decoder)
    "lcm4-vae": ("lcm", 4, 1.0, None, "vae"),
    "lcm4-taesd": ("lcm", 4, 1.0, None, "taesd"),
    "turbo1-vae": ("euler_a", 1, 0.0, "trailing", "vae"),
}
SINGLE, FOLDER = CACHE / "sd15-random.safetensors", CACHE / "sd15-random-diffusers"
TAESD_FOLDER, TAESD_FILE = CACHE / "taesd-random", CACHE / "taesd-random_decoder.safetensors"


def write_weights() -> None:
    import torch

    if not SINGLE.is_file() or not (FOLDER / "model_index.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        setup(SINGLE, FOLDER)
    if not TAESD_FILE.is_file():
        from diffusers import AutoencoderTiny
        from safetensors.torch import save_file

        torch.manual_seed(0)
        tiny = AutoencoderTiny().eval()
        tiny.save_pretrained(TAESD_FOLDER)
        save_file({f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous()  # decoder.layers.N -> N+1
                   for k, v in tiny.state_dict().items() if k.startswith("decoder.")}, str(TAESD_FILE))


def load(side: str, dtype_name: str, size: int):
    """-> (generate(sampler, steps, guidance, spacing, decoder) -> PIL image, the U-Net module, dtype name)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if side == "ours":
        import latentdiff

        pipe = latentdiff.load(SINGLE, dtype=None if dtype_name == "auto" else dtypes[dtype_name])
        pipe.load_preview(TAESD_FILE)

        def generate(sampler, steps, guidance, spacing, decoder):
            return pipe(PROMPT, sampler=sampler, steps=steps, guidance_scale=guidance, timestep_spacing=spacing,
                        decoder=decoder, height=size, width=size, seed=0, progress=False)[0]
        return generate, pipe.unet, str(pipe.dtype).removeprefix("torch.")
    import diffusers

    dtype = torch.float32 if dtype_name == "auto" else dtypes[dtype_name]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(FOLDER, torch_dtype=dtype, safety_checker=None,
                                                             local_files_only=True)
    vae, tiny = pipe.vae, diffusers.AutoencoderTiny.from_pretrained(TAESD_FOLDER, torch_dtype=dtype)
    config = pipe.scheduler.config
    pipe.set_progress_bar_config(disable=True)

    def generate(sampler, steps, guidance, spacing, decoder):
        if sampler == "lcm":
            pipe.scheduler = diffusers.LCMScheduler.from_config(config)
        else:
            pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing=spacing)
        pipe.vae = tiny if decoder == "taesd" else vae
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]
    return generate, pipe.unet, str(dtype).removeprefix("torch.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every configuration, ours then diffusers")
    ap.add_argument("--ours-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto = latentdiff.load's default (bf16 where native, else fp32; packed convs)")
    ap.add_argument("--diffusers-dtype", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    import torch

    write_weights()
    sides = {"ours": load("ours", a.ours_dtype, a.size), "diffusers": load("diffusers", a.diffusers_dtype, a.size)}
    timers = {side: UNetTimer(unet) for side, (_, unet, _) in sides.items()}
    for side, (generate, _, _) in sides.items():
        for decoder in ("vae", "taesd"):  # warm-up, every shape once: oneDNN picks kernels, our convs are packed
            generate("euler_a", 1, 0.0, "trailing", decoder)
    runs = {(side, name): [] for side in sides for name in CONFIGS}
    for r in range(a.repeats):
        for name, args in CONFIGS.items():
            for side, (generate, _, _) in sides.items():
                timer = timers[side]
                timer.total, timer.calls = 0.0, 0
                t0 = time.perf_counter()
                generate(*args)
                runs[side, name].append((time.perf_counter() - t0, timer.total))
                print(f"round {r}: {name:11s} {side:9s} image {runs[side, name][-1][0]:6.1f} s  U-Net "
                      f"{timer.total:6.1f} s", flush=True)

    def med(side, name, i):
        return statistics.median(x[i] for x in runs[side, name])

    print(f"\nSD 1.5 architecture (random weights), {a.size} x {a.size}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; ours {sides['ours'][2]}, diffusers {sides['diffusers'][2]}; "
          f"medians of {a.repeats} rounds")
    print("image s and U-Net s (the time inside the U-Net's forward); img/U-Net = image time / U-Net time")
    print("{:<12}{:>9}{:>11}{:>8}{:>12}{:>13}{:>16}{:>17}".format(
        "config", "ours", "diffusers", "ratio", "ours U-Net", "diff. U-Net", "ours img/U-Net", "diff. img/U-Net"))
    for name in CONFIGS:
        o, d, ou, du = med("ours", name, 0), med("diffusers", name, 0), med("ours", name, 1), med("diffusers", name, 1)
        print("{:<12}{:>9.1f}{:>11.1f}{:>7.2f}x{:>12.1f}{:>13.1f}{:>15.2f}x{:>16.2f}x".format(
            name, o, d, o / d, ou, du, o / ou, d / du))


if __name__ == "__main__":
    main()
