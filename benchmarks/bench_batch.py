"""images/s of `latentdiff generate --prompts` with 1 process vs N processes (accelerate launch, gloo on the CPU).

    PYTHONPATH=. python benchmarks/bench_batch.py [--jobs 16] [--steps 4] [--size 64] [--processes 2] [--threads T]
        [--model PATH | --random-preset tiny-sd15]

Each run is the CLI in a fresh folder; "gen images/s" is the summary's (the generation loop, slowest process),
"wall images/s" counts the whole command (start-up and model load included). CPU threads: the CLI's default, each
local process gets its share of the cores (LATENTDIFF_NUM_THREADS overrides), so 1 x 2 threads vs 2 x 1 thread on
a 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(n: int, prompts: Path, out: Path, a) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [] if n == 1 else ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                  "--main_process_port", str(port)]
    model = ["--random-preset", a.random_preset] if a.random_preset else (["-m", a.model] if a.model else [])
    cmd = [sys.executable, *launcher, "-m", "latentdiff", "generate", "--prompts", str(prompts), "--out-dir",
           str(out), "--steps", str(a.steps), "-W", str(a.size), "-H", str(a.size), "-q", *model]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if a.threads:
        env["LATENTDIFF_NUM_THREADS"] = str(a.threads)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{cmd} failed:\n{res.stdout}\n{res.stderr[-3000:]}")
    m = re.search(r"([\d.]+) images/s over (\d+) process", res.stdout)
    assert m and int(m.group(2)) == n, res.stdout  # no silent world size 1
    return float(m.group(1)), a.jobs / wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (LATENTDIFF_NUM_THREADS)")
    p.add_argument("--model", default=None)
    p.add_argument("--random-preset", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        prompts = Path(d) / "prompts.txt"
        prompts.write_text("".join(f"prompt number {i}, a colourful emoji\n" for i in range(a.jobs)))
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        print(f"{a.jobs} jobs, {a.steps} steps, {a.size} px, {len(os.sched_getaffinity(0))} usable cores, "
              f"avx512_bf16: {'avx512_bf16' in flags}, load average {os.getloadavg()[0]:.1f}")
        rows = {}
        for n in (1, a.processes):
            gen, wall = run(n, prompts, Path(d) / f"out{n}", a)
            rows[n] = gen
            print(f"{n} process(es): {gen:.2f} gen images/s, {wall:.2f} wall images/s")
        print(f"speed-up {a.processes} vs 1 (gen): {rows[a.processes] / rows[1]:.2f}x")


if __name__ == "__main__":
    main()
