"""Text to image in latentdiff and in diffusers, side by side: load time, time per image, s/step, peak RSS,
U-Net TFLOP/s and model FLOP utilisation, then the ratios latentdiff / diffusers (issue #7).

    python benchmarks/bench_vs_diffusers.py                 # quick: 256 x 256, 8 steps, Euler a, CFG 7.5
    python benchmarks/bench_vs_diffusers.py --full          # 512 x 512, 20 steps
    python benchmarks/bench_vs_diffusers.py --checkpoint v1-5-pruned-emaonly.safetensors --ours-dtype fp32

Without --checkpoint, seeded random SD 1.5-architecture weights are written once, in fp16 and the original
single-file layout, to ~/.cache/latentdiff/bench (plus a diffusers folder of the same weights, written by
latentdiff's `Pipeline.save(format="diffusers")`, since diffusers cannot read a single file offline without a
hub config). latentdiff loads the single file, diffusers `from_pretrained(folder)`.

Each run is its own process (peak RSS = the child's ru_maxrss), alternating A B A B. Each child loads, makes
one warm-up image (oneDNN picks kernels on first use; with --compile, torch.compile compiles) and then the timed
image. s/step is the time inside the U-Net over the steps; FLOPs per U-Net call are counted once with
torch.utils.flop_counter; the bf16 and fp32 matmul and 3x3-conv peaks are measured in the same run
(benchmarks/_peaks.py). The machine may be shared and noisy: all figures are medians.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path(os.environ.get("LATENTDIFF_BENCH_CACHE", Path.home() / ".cache" / "latentdiff" / "bench"))
PROMPT = "a photo of an astronaut riding a horse on mars"
SCHEDULERS = {  # our sampler name -> diffusers scheduler class (with the folder's scheduler config)
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
}


# --- children -----------------------------------------------------------------------------------------------


def setup(single_file: Path, folder: Path) -> None:
    """Write random SD 1.5 weights (fp16 single file) and the same weights as a diffusers folder."""
    import torch

    import latentdiff
    from _unets import random_unet
    from latentdiff.config import SD15
    from latentdiff.weights import build_modules, save_single_file

    torch.manual_seed(0)
    modules = build_modules(SD15, meta=False)  # default inits for VAE and text encoder
    del modules["unet"]
    modules["unet"] = random_unet(SD15.unet)  # no zero-initialised output convs: realistic activations
    save_single_file(single_file, SD15, modules, dtype=torch.float16)
    del modules
    latentdiff.load(single_file, dtype=torch.float16).save(folder, format="diffusers", dtype=torch.float16)


class UNetTimer:
    """Wall time spent inside the U-Net's forward (pre/post hooks), and the number of calls. On a GPU `sync`
    waits for the queued kernels at both ends, so the time is the U-Net's and not the launch's."""

    def __init__(self, unet, sync=lambda: None):
        self.total, self.calls, self.sync = 0.0, 0, sync
        unet.register_forward_pre_hook(self._start)
        unet.register_forward_hook(self._stop)

    def _start(self, *_):
        self.sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.sync()
        self.total += time.perf_counter() - self._t0
        self.calls += 1


def worker(a) -> dict:
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    t0 = time.perf_counter()
    if a.worker == "ours":
        import latentdiff

        # auto: load()'s default (dtype=None), the fast path; an explicit fp32 would be the exact, unpacked one
        pipe = latentdiff.load(a.checkpoint, device=a.device, dtype=None if a.dtype == "auto" else dtypes[a.dtype])
        dtype = pipe.dtype
        if a.compile:
            pipe.compile()  # compiles during the first image: its extra time is reported as compile_s

        def generate():
            return pipe(PROMPT, guidance_scale=a.guidance, steps=a.steps, sampler=a.sampler, height=a.size,
                        width=a.size, seed=0, num_images=a.batch, progress=False)[0]
    else:
        import diffusers
        from diffusers import StableDiffusionPipeline

        dtype = torch.float32 if a.dtype == "auto" else dtypes[a.dtype]
        pipe = StableDiffusionPipeline.from_pretrained(a.folder, torch_dtype=dtype, safety_checker=None,
                                                       local_files_only=True)
        pipe.scheduler = getattr(diffusers, SCHEDULERS[a.sampler]).from_config(pipe.scheduler.config)
        pipe.to(a.device)
        if a.device != "cpu":  # PyTorch's SDPA kernels (flash / memory-efficient), said explicitly
            from diffusers.models.attention_processor import AttnProcessor2_0

            pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.vae.set_attn_processor(AttnProcessor2_0())
        pipe.set_progress_bar_config(disable=True)

        def generate():
            return pipe(PROMPT, guidance_scale=a.guidance, num_inference_steps=a.steps, height=a.size,
                        width=a.size, num_images_per_prompt=a.batch,
                        generator=torch.Generator("cpu").manual_seed(0)).images[0]
    load_s = time.perf_counter() - t0
    compiled = getattr(pipe, "_compiled_unet", None)  # ours after pipe.compile(): time the compiled module
    cuda = a.device.startswith("cuda")
    timer = UNetTimer(pipe.unet if compiled is None else compiled, torch.cuda.synchronize if cuda else lambda: None)
    warmup_s = 0.0
    if a.warmup:
        t0 = time.perf_counter()
        generate()
        warmup_s = time.perf_counter() - t0
    timer.total, timer.calls = 0.0, 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    image = generate()  # a PIL image: the GPU's work is done
    image_s = time.perf_counter() - t0
    image.save(Path(a.out_dir) / f"{a.worker}.png")
    return {"load_s": load_s, "image_s": image_s, "unet_s": timer.total, "unet_calls": timer.calls,
            "step_s": timer.total / a.steps, "compile_s": warmup_s - image_s if a.compile else 0.0,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "dtype": str(dtype).removeprefix("torch.")}


# --- parent -------------------------------------------------------------------------------------------------


def run_child(side: str, a, dtype: str, checkpoint: Path, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--dtype", dtype, "--checkpoint", str(checkpoint),
           "--folder", str(folder), "--size", str(a.size), "--steps", str(a.steps), "--sampler", a.sampler,
           "--guidance", str(a.guidance), "--warmup", str(a.warmup), "--out-dir", str(a.out_dir), "--device", a.device,
           "--batch", str(a.batch)]
    if a.compile and side == "ours":
        cmd.append("--compile")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{side} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="512 x 512, 20 steps (default: quick, 256 x 256, 8 steps)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default="euler_a", choices=sorted(SCHEDULERS))
    p.add_argument("--batch", type=int, default=1, help="images per call (one prompt); the U-Net batch is twice "
                   "that with CFG")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--ours-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = latentdiff.load's default (dtype=None: bf16 where native, else fp32; packed convs)")
    p.add_argument("--diffusers-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=2, help="A B pairs")
    p.add_argument("--warmup", type=int, default=1, choices=[0, 1], help="one untimed image per process first")
    p.add_argument("--compile", action="store_true",
                   help="latentdiff side: pipe.compile() (torch.compile with weight freezing); needs --warmup 1, "
                        "its compile time is the warm-up image's extra time")
    p.add_argument("--checkpoint", default=None, help="an SD 1.5-architecture single file (default: random)")
    p.add_argument("--folder", default=None, help="the same weights as a diffusers folder")
    p.add_argument("--out-dir", default=None, help="where each side's last image goes")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on a GPU the peak memory is the GPU's "
                   "(max_memory_allocated of the timed image) and MFU is not computed (the peaks are CPU ones)")
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.size = a.size or (512 if a.full else 256)
    a.steps = a.steps or (20 if a.full else 8)
    a.out_dir = Path(a.out_dir or CACHE / "images")
    if a.compile and not a.warmup:
        p.error("--compile needs --warmup 1 (the first image compiles)")
    if a.worker:
        print(json.dumps(worker(a)))
        return

    import torch

    from _peaks import measure_peaks
    from _unets import unet_flops
    from latentdiff import speed
    from latentdiff.config import SD15

    a.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(a.checkpoint) if a.checkpoint else CACHE / "sd15-random-fp16.safetensors"
    folder = Path(a.folder) if a.folder else checkpoint.with_suffix("").with_name(checkpoint.stem + "-diffusers")
    if not checkpoint.is_file() or not (folder / "model_index.json").is_file():
        if a.checkpoint and not checkpoint.is_file():
            raise SystemExit(f"no checkpoint at {checkpoint}")
        print(f"writing the benchmark weights to {checkpoint} and {folder} (once) ...", flush=True)
        t0 = time.perf_counter()
        if a.checkpoint:  # a released file: only the diffusers folder is missing
            import latentdiff

            latentdiff.load(checkpoint, dtype=torch.float16).save(folder, format="diffusers", dtype=torch.float16)
        else:
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"from bench_vs_diffusers import setup; from pathlib import Path; "
                            f"setup(Path({str(checkpoint)!r}), Path({str(folder)!r}))"], check=True)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

    cpu = a.device == "cpu"
    peaks = measure_peaks() if cpu else None  # CPU peaks: no MFU on a GPU
    flops = unet_flops(SD15.unet, a.size, (2 if a.guidance > 1 else 1) * a.batch)
    runs = {"ours": [], "diffusers": []}
    for r in range(a.repeats):
        for side, dtype in (("ours", a.ours_dtype), ("diffusers", a.diffusers_dtype)):
            res = run_child(side, a, dtype, checkpoint, folder)
            runs[side].append(res)
            print(f"repeat {r}: {side:9s} {res['dtype']:8s} load {res['load_s']:6.1f} s  image {res['image_s']:6.1f} s"
                  f"  step {res['step_s']:6.2f} s  peak RSS {res['rss_gb']:5.2f} GB"
                  + (f"  GPU peak {res['gpu_gb']:5.2f} GB" if res["gpu_gb"] else "")
                  + (f"  compile {res['compile_s']:5.1f} s" if res["compile_s"] else ""), flush=True)

    def med(side, key):
        return statistics.median(r[key] for r in runs[side])

    if not cpu:
        print(f"\nSD 1.5 architecture on {a.device} ({torch.cuda.get_device_name(a.device)}), {a.size} x {a.size}, "
              f"{a.steps} steps, {a.sampler}, CFG {a.guidance}; medians of {a.repeats}")
        print("{:<10}{:>10}{:>8}{:>9}{:>8}{:>13}{:>13}".format("", "dtype", "load s", "image s", "s/step",
                                                             "GPU peak GB", "peak RSS GB"))
        rows = [(side, runs[side][0]["dtype"], *(med(side, k) for k in ("load_s", "image_s", "step_s", "gpu_gb",
                                                                         "rss_gb"))) for side in runs]
        for r in rows:
            print("{:<10}{:>10}{:>8.1f}{:>9.2f}{:>8.3f}{:>13.2f}{:>13.2f}".format(*r))
        o, d = rows
        print("{:<10}{:>10}{:>7.2f}x{:>8.2f}x{:>7.2f}x{:>12.2f}x{:>12.2f}x".format(
            "ratio", "", *(x / y for x, y in zip(o[2:], d[2:]))))
        return
    peaks_after = measure_peaks()
    peaks = {k: max(v, peaks_after[k]) for k, v in peaks.items()}

    print(f"\nSD 1.5 architecture, {a.size} x {a.size}, {a.steps} steps, {a.sampler}, CFG {a.guidance}, "
          f"{torch.get_num_threads()} threads; medians of {a.repeats}; U-Net {flops / 1e12:.3f} TFLOP per call")
    print("peaks measured now (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()))
    rows = []
    for side in ("ours", "diffusers"):
        calls = med(side, "unet_calls")
        tflops = flops * calls / med(side, "unet_s") / 1e12
        dt = runs[side][0]["dtype"]
        peak = "bf16" if dt in ("bfloat16", "float16") else "fp32"
        rows.append((side, dt, med(side, "load_s"), med(side, "image_s"), med(side, "step_s"), med(side, "rss_gb"),
                     tflops, tflops * 1e12 / peaks[f"conv_{peak}"], tflops * 1e12 / peaks[f"matmul_{peak}"]))
    head = ("", "dtype", "load s", "image s", "s/step", "peak RSS GB", "U-Net TFLOP/s", "MFU conv", "MFU matmul")
    print("{:<10}{:>10}{:>8}{:>9}{:>8}{:>13}{:>15}{:>10}{:>12}".format(*head))
    for r in rows:
        print("{:<10}{:>10}{:>8.1f}{:>9.1f}{:>8.2f}{:>13.2f}{:>15.3f}{:>10.0%}{:>12.0%}".format(*r))
    o, d = rows
    print("{:<10}{:>10}{:>7.2f}x{:>8.2f}x{:>7.2f}x{:>12.2f}x{:>14.2f}x".format(
        "ratio", "", o[2] / d[2], o[3] / d[3], o[4] / d[4], o[5] / d[5], o[6] / d[6]))
    if speed.cpu_has_native_bf16():
        print("(MFU against the peak of each side's own dtype; the issue's target is MFU vs the bf16 conv peak: "
              f"{rows[0][6] * 1e12 / peaks['conv_bf16']:.0%} for latentdiff)")
    else:  # emulated bf16 has no meaningful peak; latentdiff's default is fp32 here
        print(f"(MFU against the peak of each side's own dtype; this CPU ({torch.backends.cpu.get_cpu_capability()}) "
              "has no native bf16, so latentdiff's default runs fp32 and the issue's bf16-peak target does not apply)")


if __name__ == "__main__":
    main()
