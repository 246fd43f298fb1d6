"""latentdiff.batch (issue #25): `generate --prompts FILE --out-dir DIR` over 1 process, 2 processes (accelerate's
torchrun launcher, gloo on the CPU) and two "machines" on 127.0.0.1 give the same PNG bytes and manifest; a SIGKILL
mid-run and a rerun complete exactly the missing jobs; bad jobs are one error line each and a non-zero exit.

Equal bytes across process counts need equal CPU threads per process: every run here uses LATENTDIFF_NUM_THREADS=1.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from latentdiff import batch

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{"prompt": "a red apple"},
        {"prompt": "a cat", "seed": 42, "negative_prompt": "blurry"},
        {"prompt": "a dog on the beach"},
        {"prompt": "a tree", "guidance_scale": 3.0, "sampler": "euler_a"},
        {"prompt": "a house", "size": "64x64"},
        {"prompt": "two cars", "num_images": 2}]
BAD = [{"prompt": "no steps", "steps": 0}, {"prompt": "a sun", "sampler": "nope"}]
JOBS = GOOD + BAD  # indices 0-5 ok (7 images), 6 and 7 fail
OK_FILES = {"00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "00005-0.png", "00005-1.png"}
ARGS = ["generate", "--steps", "2", "-W", "64", "-H", "64", "--seed", "100", "-q"]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LATENTDIFF_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LATENTDIFF_BATCH_KILL_AT", None)
    return {**env, **extra}


def _cli(jobs: Path, out: Path, launcher: list[str] = (), **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "latentdiff", *ARGS, "--prompts", str(jobs), "--out-dir", str(out)]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300, cwd=ROOT)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int) -> list[str]:
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port())]


def _manifest(out: Path) -> list[dict]:
    """Every line parses (a torn or interleaved line fails here)."""
    return [json.loads(line) for line in (out / batch.MANIFEST).read_text().splitlines()]


def _timeless(records: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in ("time", "seconds")} for r in records),
                  key=lambda r: r["index"])


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _check_done(out: Path, res: subprocess.CompletedProcess, processes: int) -> None:
    assert res.returncode != 0, res.stderr  # jobs 6 and 7 failed
    assert "7 images, 2 failed job(s)" in res.stdout, res.stdout + res.stderr
    assert f"over {processes} process(es)" in res.stdout  # no silent world size 1
    assert set(_pngs(out)) == OK_FILES
    recs = _manifest(out)
    assert sorted(r["index"] for r in recs) == list(range(8))
    bad = {r["index"]: r["error"] for r in recs if r["status"] == "error"}
    assert set(bad) == {6, 7} and "steps" in bad[6] and "nope" in bad[7]
    assert list((out / batch.CLAIMS).iterdir()) == [] and not list(out.glob(".*.tmp.png"))


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("jobs") / "jobs.jsonl"
    p.write_text("".join(json.dumps(j) + "\n" for j in JOBS))
    return p


@pytest.fixture(scope="module")
def one(jobs_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    _check_done(out, _cli(jobs_file, out), 1)
    return out


def test_one_process(one):
    recs = {r["index"]: r for r in _manifest(one)}
    assert [recs[i]["seed"] for i in range(8)] == [100, 42, 102, 103, 104, 105, 106, 107]  # base_seed + i
    assert recs[1]["params"]["negative_prompt"] == "blurry" and recs[3]["params"]["sampler"] == "euler_a"
    assert recs[0]["file"] == "00000.png" and recs[5]["files"] == ["00005-0.png", "00005-1.png"]
    from PIL import Image
    text = Image.open(one / "00001.png").info["parameters"]  # A1111 parameters chunk
    assert text.startswith("a cat\nNegative prompt: blurry\n") and "Seed: 42" in text and "Steps: 2" in text


def test_two_processes_same_bytes(jobs_file, one, tmp_path):
    out = tmp_path / "out"
    _check_done(out, _cli(jobs_file, out, _launch(2)), 2)
    assert _pngs(out) == _pngs(one)
    assert _timeless(_manifest(out)) == _timeless(_manifest(one))


def test_sigkill_then_rerun(jobs_file, one, tmp_path):
    out = tmp_path / "out"
    res = _cli(jobs_file, out, LATENTDIFF_BATCH_KILL_AT="3")  # SIGKILL with job 3's temporary PNG written
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert sorted(r["index"] for r in _manifest(out)) == [0, 1, 2]
    assert not (out / "00003.png").exists() and list(out.glob(".00003.*.tmp.png"))
    assert [p.name for p in (out / batch.CLAIMS).iterdir()] == ["00003"]  # the dead run's claim: no flock left
    (out / "00001.png").write_bytes(b"broken")  # a damaged image is redone too
    before = len(_manifest(out))
    res = _cli(jobs_file, out)
    assert res.returncode != 0 and "5 images, 2 failed job(s), 2 of 8 jobs done before" in res.stdout, res.stdout
    recs = _manifest(out)
    assert sorted(r["index"] for r in recs[before:]) == [1, 3, 4, 5, 6, 7]  # exactly the missing / broken / failed
    assert _pngs(out) == _pngs(one)
    assert list((out / batch.CLAIMS).iterdir()) == [] and not list(out.glob(".*.tmp.png"))
    last = {r["index"]: r for r in recs}
    assert _timeless(list(last.values())) == _timeless(_manifest(one))


def test_two_machines_on_loopback(jobs_file, one, tmp_path):
    out, port = tmp_path / "out", _port()
    procs = []
    for rank in (0, 1):
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                    "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [sys.executable, *launcher, "-m", "latentdiff", *ARGS, "--prompts", str(jobs_file), "--out-dir", str(out)]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    _check_done(out, results[0], 2)  # machine 0 prints the summary
    assert results[1].returncode != 0
    assert _pngs(out) == _pngs(one)
    assert _timeless(_manifest(out)) == _timeless(_manifest(one))


def test_claims(tmp_path):
    (tmp_path / batch.CLAIMS).mkdir()
    fd = batch.claim(tmp_path, 7)
    assert fd is not None and batch.claim(tmp_path, 7) is None  # held (flock) by a live holder
    batch.release(tmp_path, 7, fd)
    assert not (tmp_path / batch.CLAIMS / "00007").exists()
    (tmp_path / batch.CLAIMS / "00008").write_text("pid 1 on elsewhere\n")  # its holder died: no flock
    fd = batch.claim(tmp_path, 8)
    assert fd is not None and f"pid {os.getpid()}" in (tmp_path / batch.CLAIMS / "00008").read_text()
    batch.release(tmp_path, 8, fd)


def test_read_jobs_and_resolve(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a\n\nb\n")
    assert batch.read_jobs(txt) == [{"prompt": "a"}, {"prompt": "b"}]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    jobs = batch.read_jobs(bad)
    assert jobs[0] == {"prompt": "x"} and isinstance(jobs[1], ValueError)
    with pytest.raises(ValueError):
        batch.read_jobs(tmp_path / "p.csv")


def test_generate_many_api(tmp_path):
    import latentdiff
    pipe = latentdiff.load()
    jobs = ["a red apple", {"prompt": "a cat", "seed": 5}, {"prompt": "x", "sampler": "nope"}]
    s = batch.generate_many(pipe, jobs, tmp_path, base_seed=10, progress=False, steps=1, width=64, height=64)
    assert (s["jobs"], s["images"], s["failures"], s["done_before"]) == (3, 2, 1, 0)
    assert [r["seed"] for r in _manifest(tmp_path)] == [10, 5, 12]
    s = batch.generate_many(pipe, jobs, tmp_path, base_seed=10, progress=False, steps=1, width=64, height=64)
    assert (s["images"], s["failures"], s["done_before"]) == (0, 1, 2)  # only the failed job runs again


def test_concurrent_runs_share_one_dir(one, tmp_path):
    """Two runs started at once on one DIR: every job runs once (claim files), the images are the same."""
    jobs = tmp_path / "good.jsonl"
    jobs.write_text("".join(json.dumps(j) + "\n" for j in GOOD))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "latentdiff", *ARGS, "--prompts", str(jobs), "--out-dir", str(out)]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stdout + stderr
    recs = _manifest(out)
    assert sorted(r["index"] for r in recs) == list(range(6)) and all(r["status"] == "ok" for r in recs)
    assert _pngs(out) == _pngs(one)
