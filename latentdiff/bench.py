"""`latentdiff bench`: runs benchmarks/bench_vs_diffusers.py (latentdiff vs diffusers, side by side).

The benchmark needs diffusers, which latentdiff itself never imports, so it lives in the repository's
benchmarks/ folder and runs as a script; all arguments pass through (see `latentdiff bench --help`).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_vs_diffusers.py"


def main(argv: list[str] | None = None) -> None:
    if not SCRIPT.is_file():
        sys.exit(f"error: {SCRIPT} not found: `latentdiff bench` needs a checkout of the repository "
                 "(pip install -e '.[test]'), since the benchmark also runs diffusers")
    argv = sys.argv[1:] if argv is None else list(argv)
    old = sys.argv
    sys.argv = [str(SCRIPT), *argv]
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = old
