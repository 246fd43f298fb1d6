"""Peak RSS while loading an SD 1.5-layout single file, against the file size (issue #3: <= 1.3x in fp16).

    python benchmarks/bench_load_rss.py [--checkpoint FILE] [--dtype fp16|bf16|fp32]

Without --checkpoint it uses (and first writes, once) the random-weight fp16 SD 1.5 file of
bench_vs_diffusers.py. The load runs in a fresh child process, so ru_maxrss is the load's own peak; the child
also touches every weight once (a sum), since a memory-mapped tensor costs nothing until it is read.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = """
import json, resource, sys, time, torch, latentdiff
import latentdiff.models.text, latentdiff.models.unet, latentdiff.models.vae, latentdiff.weights  # all imports first
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
pipe = latentdiff.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
load_s = time.perf_counter() - t
n = 0
for m in (pipe.unet, pipe.vae, pipe.text_encoders):
    for p in m.parameters():
        p.sum()  # read every page
        n += p.numel()
print(json.dumps({"load_s": load_s, "params": n, "base_kb": base_kb,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    a = ap.parse_args()
    if a.checkpoint is None:
        from bench_vs_diffusers import CACHE, setup

        a.checkpoint = CACHE / "sd15-random-fp16.safetensors"
        if not a.checkpoint.is_file():
            a.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            setup(a.checkpoint, a.checkpoint.with_name(a.checkpoint.stem + "-diffusers"))
    dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[a.dtype]
    out = subprocess.run([sys.executable, "-c", CHILD, str(a.checkpoint), dtype], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = a.checkpoint.stat().st_size
    rss, base = r["maxrss_kb"] * 1024, r["base_kb"] * 1024
    print(f"file {a.checkpoint} {size / 2**30:.2f} GiB; load as {a.dtype}: {r['load_s']:.1f} s; peak RSS "
          f"{rss / 2**30:.2f} GiB = {rss / size:.2f}x the file, of which {base / 2**30:.2f} GiB is the process "
          f"after its imports; the load adds {(rss - base) / size:.2f}x ({r['params'] / 1e6:.0f} M parameters)")


if __name__ == "__main__":
    main()
