"""Many prompts over processes and machines: a jobs file in, one PNG per image and a manifest out, resumable.

    accelerate launch [--multi_gpu --num_processes N] -m latentdiff generate --prompts jobs.jsonl --out-dir out/
    latentdiff.generate_many(pipe, "jobs.jsonl", "out/", steps=20)

    jobs file -> job i (seed base_seed + i unless it names one) -> main process reads DIR/manifest.jsonl,
    pending = jobs without a verified image -> broadcast -> PartialState.split_between_processes ->
    each process, per job: claim DIR/.claims/NNNNN (O_CREAT|O_EXCL) -> one pipeline call ->
    .NNNNN.<pid>.tmp.png -> fsync -> os.replace to NNNNN.png -> one manifest line -> drop the claim

Concurrent runs on one DIR (two launches, or a rerun while a run is still going) do not collide: a job is run
only by the holder of its claim file, which also holds an flock on it while it works; a claim whose holder died
(SIGKILL, power loss) has no flock left and is taken over. After claiming, the manifest is read again, so a job
that another run finished in the meantime is skipped.

No batching: every job is its own pipeline call with its own generator, so its noise is that of a batch of one
and an image depends only on its job and the model, never on the process count or on its neighbours. (The
pipeline batches prompts under one generator: batching jobs with different seeds would need per-job noise
draws, and ancestral / SDE samplers draw per-step noise for the whole batch from one generator.)
On the CPU the arithmetic itself depends on the number of threads per process (oneDNN / GEMM blocking: 1 and 2
threads gave other PNG bytes for the same job, fp32 and bf16 alike), so equal bytes across process counts need
equal threads per process: LATENTDIFF_NUM_THREADS=N (see cpu_threads).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from .images import save_png

log = logging.getLogger("latentdiff")


class BatchError(RuntimeError):
    """The run cannot start: the main process could not read or create its folder."""


MANIFEST = "manifest.jsonl"
CLAIMS = ".claims"
KILL_HOOK = "LATENTDIFF_BATCH_KILL_AT"  # tests: SIGKILL the process once job N's temporary PNG is written
# keyword arguments of Pipeline.__call__ that a job (or the defaults) may set; a job may also give `size`
PARAMS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "sampler", "schedule",
          "timestep_spacing", "width", "height", "num_images", "clip_skip", "guidance_rescale", "eta")


# --- jobs -----------------------------------------------------------------------------------------------------

def read_jobs(path: str | os.PathLike) -> list:
    """`.txt`: one prompt a line; `.jsonl`: one JSON object a line (`prompt` and any of PARAMS, or `size` as
    "WxH", [W, H] or one side). Blank lines are skipped: job i is the i-th other line. A line that is not a
    JSON object stays a job, one that fails with that error (a ValueError in the list), as a bad parameter does."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--prompts must be a .txt (one prompt a line) or .jsonl (one job a line) file, "
                         f"got {path.name!r}")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    if path.suffix == ".txt":
        return [{"prompt": line} for _, line in lines]
    jobs = []
    for n, line in lines:
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            job = ValueError(f"{path.name} line {n} is not JSON: {e}")
        if not isinstance(job, (dict, ValueError)):
            job = ValueError(f"{path.name} line {n}: a job is a JSON object, got {type(job).__name__}")
        jobs.append(job)
    return jobs


def _size(v) -> tuple[int, int]:
    """`size` -> (width, height)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, str) and v.count("x") == 1 and all(s.strip().isdigit() for s in v.split("x")):
        w, h = v.split("x")
        return int(w), int(h)
    if isinstance(v, list) and len(v) == 2 and all(isinstance(s, int) for s in v):
        return v[0], v[1]
    raise ValueError(f"size must be \"WxH\", [W, H] or one integer side, got {v!r}")


def resolve(job, index: int, base_seed: int, defaults: dict, cfg) -> dict:
    """Every pipeline parameter of job `index`, explicit: the job's own, else `defaults` (the command line's),
    else the model's (cfg); the seed: the job's, else base_seed + index. A null value means "not given".
    Raises ValueError for a job that cannot run; the values themselves are checked by the pipeline."""
    if isinstance(job, Exception):
        raise job
    if isinstance(job, str):
        job = {"prompt": job}
    unknown = sorted(set(job) - set(PARAMS) - {"size"})
    if unknown:
        raise ValueError(f"unknown job keys {unknown}; allowed: {sorted(PARAMS + ('size',))}")
    job = {k: v for k, v in job.items() if v is not None}
    if "size" in job:
        if "width" in job or "height" in job:
            raise ValueError("a job gives either size or width / height, not both")
        job["width"], job["height"] = _size(job.pop("size"))
    if not isinstance(job.get("prompt"), str):
        raise ValueError(f"a job needs a 'prompt' string, got {job.get('prompt')!r}")
    seed = job.get("seed", base_seed + index)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    p = {**defaults, **job}
    return {"prompt": p["prompt"], "negative_prompt": p.get("negative_prompt"), "seed": seed,
            "steps": p.get("steps", cfg.steps), "guidance_scale": p.get("guidance_scale", cfg.guidance_scale),
            "sampler": p.get("sampler", cfg.sampler), "schedule": p.get("schedule", "normal"),
            "timestep_spacing": p.get("timestep_spacing", cfg.timestep_spacing),
            "width": p.get("width", cfg.size), "height": p.get("height", cfg.size),
            "num_images": p.get("num_images", 1), "clip_skip": p.get("clip_skip"),
            "guidance_rescale": p.get("guidance_rescale", 0.0)}


# --- the output folder: lock, atomic files, manifest -----------------------------------------------------------

def claim(out: Path, index: int) -> int | None:
    """Claim job `index` for this process: create DIR/.claims/NNNNN with O_CREAT|O_EXCL and flock it. A claim
    file that exists but has no flock (its holder died: the kernel drops flocks with their process) is taken
    over. Returns the descriptor (release() drops the claim), or None while another live run holds the job."""
    path = out / CLAIMS / f"{index:05d}"
    me = f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # released just now: next time
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st, now = os.fstat(fd), time.time()
            if os.stat(path).st_ino != st.st_ino:  # released and re-created under us
                raise BlockingIOError
            if st.st_size == 0 and now - st.st_mtime < 30:  # its creator is between open and flock
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        log.warning("job %d: taking over the claim of a run that died (%s)", index,
                    os.pread(fd, 200, 0).decode(errors="replace").strip())
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        return fd
    # a fresh file: only another run probing it (its LOCK_NB above, released at once) can hold the lock an instant
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, me)
    return fd


def release(out: Path, index: int, fd: int) -> None:
    """Drop a claim: unlink while still holding the flock, then close (a waiter checks the inode)."""
    try:
        os.unlink(out / CLAIMS / f"{index:05d}")
    except FileNotFoundError:
        pass
    os.close(fd)


def append_line(path: Path, record: dict) -> None:
    """One JSON line, appended in one write() to an O_APPEND descriptor, then fsynced: lines of several processes
    never interleave (appends are atomic on a local file system; on NFS only within one client) and a kill
    leaves whole lines."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(out: Path, since: list | None = None) -> dict[int, dict]:
    """The last record of every job index. Lines that do not parse (torn by a power loss, or two NFS clients
    appending at once) are skipped with a warning: their jobs count as not done. `since` = (records, offset) of
    an earlier read, updated in place: only the lines appended after it are read (a check per job stays O(new))."""
    records, offset = since if since is not None else ({}, 0)
    try:
        with open(out / MANIFEST, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return records
    end = data.rfind(b"\n") + 1  # a line still being written is read next time
    bad = 0
    for line in data[:end].splitlines():
        try:
            rec = json.loads(line)
            records[int(rec["index"])] = rec
        except (ValueError, KeyError, TypeError):
            bad += 1
    if since is not None:
        since[1] = offset + end
    if bad:
        log.warning("%s: %d unreadable line(s) skipped; their jobs run again", out / MANIFEST, bad)
    return records


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _finished(rec: dict | None, params: dict, model: str, out: Path) -> bool:
    """Done = the last record is a success for these very parameters and model, and every file it names is on
    disk with the recorded hash (a truncated or replaced file is redone)."""
    return (rec is not None and rec.get("status") == "ok" and rec.get("params") == params
            and rec.get("model") == model and len(rec.get("files", ())) == params["num_images"]
            and all(_sha256(out / f) == h for f, h in zip(rec["files"], rec["sha256"])))


def _names(index: int, n: int) -> list[str]:
    return [f"{index:05d}.png"] if n == 1 else [f"{index:05d}-{k}.png" for k in range(n)]


def _write_png(image, path: Path, index: int) -> str:
    """Written under a hidden temporary name, fsynced, then renamed: a final name only ever shows a whole PNG."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")  # .png: PIL picks the format from the name
    with open(tmp, "wb") as f:
        save_png(image, f)
        f.flush()
        if os.environ.get(KILL_HOOK) == str(index):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, path)
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames are durable before the manifest line that names them
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --- processes -------------------------------------------------------------------------------------------------

def process_state(device: str | None = None) -> PartialState:
    """accelerate's state for this process. CPU work must say cpu=True: otherwise a `--multi_gpu` launch on a
    host without an accelerator silently runs every process alone (world size 1) instead of over gloo."""
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or (device is None and not has_accel)
    return PartialState(cpu=cpu)


def cpu_threads() -> int:
    """Each local process gets its share of the usable cores (accelerate launch sets OMP_NUM_THREADS=1 where it
    counts one physical core); LATENTDIFF_NUM_THREADS overrides. The same rule as train.loop.cpu_threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = int(os.environ.get("LATENTDIFF_NUM_THREADS", 0)) or max(cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    torch.set_num_threads(n)
    return n


class _Progress:
    """The main process's bar over every process's images: each process appends its own manifest lines, and a
    thread reads the lines added since the run began every half second (no collective, so no process waits)."""

    def __init__(self, path: Path, offset: int, expected: dict[int, int], disable: bool):
        self.path, self.offset, self.expected, self.failed = path, offset, expected, 0
        self.bar = tqdm(total=sum(expected.values()), unit="img", desc="generate", disable=disable)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
                index = rec["index"]
            except (ValueError, KeyError, TypeError):
                continue
            if rec.get("status") != "ok":
                self.failed += 1
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(self.expected.get(index, 1))

    def _follow(self) -> None:
        while not self.stop.wait(0.5):
            self._read()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self._read()
        self.bar.close()


def _run(pipe, index: int, params: dict | None, error: str | None, job, model: str, out: Path) -> dict:
    """One job -> its PNGs and its manifest line; any failure becomes the line's error, never an exception."""
    t0 = time.perf_counter()
    rec = {"index": index}
    if error is None:
        rec.update(seed=params["seed"], params=params, model=model)
        try:
            kw = {k: v for k, v in params.items() if k != "prompt"}
            images = pipe(params["prompt"], progress=False, **kw)
            names = _names(index, len(images))
            rec = {"index": index, "status": "ok", "file": names[0], "files": names,
                   "sha256": [_write_png(im, out / n, index) for im, n in zip(images, names)], **rec}
            _fsync_dir(out)
        except Exception as e:  # a bad value, and anything else one job can hit: recorded, the others go on
            error = f"{type(e).__name__}: {e}"
    if error is not None:
        rec = {"index": index, "status": "error", "error": error, **rec}
        if "params" not in rec:
            rec["job"] = job if isinstance(job, dict) else None
        log.warning("job %d failed: %s", index, error)
    rec.update(time=_now(), seconds=round(time.perf_counter() - t0, 3))
    append_line(out / MANIFEST, rec)
    return rec


def generate_many(pipe, jobs, out_dir: str | os.PathLike, base_seed: int = 0, *, progress: bool = True,
                  **defaults) -> dict:
    """Generate every job into out_dir, split between the processes of an accelerate launch (or one process).

    jobs: a `.txt` / `.jsonl` path (read_jobs) or a list of prompts and job dicts; job i gets seed
    `base_seed + i` unless it names one (one job = one pipeline call with its own generator, so a job's image is
    exactly the one `pipe(prompt, seed=...)` gives, whatever the process count). defaults: pipeline keywords for
    jobs that do not set them (steps=20, width=64, ...).
    Writes NNNNN.png (NNNNN-k.png for num_images > 1) and one DIR/manifest.jsonl line per job; jobs already done
    (an ok line and the PNG with its recorded hash) are skipped, failed and missing ones run again; jobs claimed
    by another live run on the same DIR are left to it. Call it on every process, with the same jobs.
    Returns the summary on every process: {"jobs", "done_before", "images", "failures", "claimed_elsewhere",
    "seconds", "images_per_s", "processes": [{"process", "images", "failures", "seconds", "images_per_s"}, ...]}.
    Under a multi-process launch, destroy the process group at exit (PartialState().destroy_process_group()).
    """
    unknown = sorted(set(defaults) - set(PARAMS) | set(defaults) & {"prompt", "seed"})
    if unknown:
        raise ValueError(f"generate_many: unknown defaults {unknown}; allowed: "
                         f"{sorted(set(PARAMS) - {'prompt', 'seed'})} (the base seed is base_seed=)")
    state = PartialState(cpu=pipe.device.type == "cpu")
    if pipe.device.type != "cpu" and pipe.device != state.device:
        pipe.to(state.device)  # one device per process
    jobs = read_jobs(jobs) if isinstance(jobs, (str, os.PathLike)) else list(jobs)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    model = pipe.source or pipe.cfg.name
    resolved = []  # (params, None) or (None, error), the same on every process
    for i, job in enumerate(jobs):
        try:
            resolved.append((resolve(job, i, base_seed, defaults, pipe.cfg), None))
        except ValueError as e:
            resolved.append((None, str(e)))
    out = Path(out_dir)

    def done(i: int, records: dict) -> bool:
        p, err = resolved[i]
        return err is None and _finished(records.get(i), p, model, out)

    plan, failure = [None], None
    if state.is_main_process:
        try:
            (out / CLAIMS).mkdir(parents=True, exist_ok=True)
            records = read_manifest(out)
            pending = [i for i in range(len(jobs)) if not done(i, records)]
            offset = (out / MANIFEST).stat().st_size if (out / MANIFEST).exists() else 0
            plan = [(pending, offset)]
        except Exception as e:
            failure, plan = e, [f"{type(e).__name__}: {e}"]
    broadcast_object_list(plan)  # every process works from the main process's one reading of the folder
    if isinstance(plan[0], str):
        raise failure if failure is not None else BatchError(f"main process: {plan[0]}")
    pending, offset = plan[0]

    bar = None
    try:
        if state.is_main_process:
            expected = {i: resolved[i][0]["num_images"] if resolved[i][0] else 1 for i in pending}
            bar = _Progress(out / MANIFEST, offset, expected, disable=not progress)
        t0, images, failures, elsewhere = time.perf_counter(), 0, 0, 0
        seen = [{}, 0]  # manifest records read so far and where reading stopped
        with state.split_between_processes(pending) as mine:
            for i in mine:
                fd = claim(out, i)
                if fd is None:  # another live run on this DIR has it
                    elsewhere += 1
                    continue
                try:
                    if done(i, read_manifest(out, seen)):  # finished by another run since the plan was made
                        continue
                    for tmp in out.glob(f".{i:05d}*.tmp.png"):  # left by a killed run; the job is ours now
                        tmp.unlink(missing_ok=True)
                    rec = _run(pipe, i, *resolved[i], jobs[i], model, out)
                finally:
                    release(out, i, fd)
                images += len(rec.get("files", ()))
                failures += rec["status"] != "ok"
        seconds = time.perf_counter() - t0
        stats = gather_object([{"process": state.process_index, "images": images, "failures": failures,
                                "claimed_elsewhere": elsewhere, "seconds": round(seconds, 3),
                                "images_per_s": round(images / max(seconds, 1e-9), 3)}])
    finally:
        if bar is not None:
            bar.close()
    total, wall = sum(s["images"] for s in stats), max(s["seconds"] for s in stats)
    return {"jobs": len(jobs), "done_before": len(jobs) - len(pending), "images": total,
            "failures": sum(s["failures"] for s in stats),
            "claimed_elsewhere": sum(s["claimed_elsewhere"] for s in stats), "seconds": wall,
            "images_per_s": round(total / max(wall, 1e-9), 3), "processes": stats}


def format_summary(s: dict, out_dir) -> str:
    lines = [f"{s['images']} images, {s['failures']} failed job(s), {s['done_before']} of {s['jobs']} jobs done "
             f"before, {s['claimed_elsewhere']} left to another run; {s['images_per_s']:.2f} images/s over {len(s['processes'])} process(es) in {s['seconds']:.1f} s"]
    lines += [f"  process {p['process']}: {p['images']} images, {p['failures']} failed, {p['images_per_s']:.2f} "
              f"images/s" for p in s["processes"]]
    lines.append(f"manifest: {Path(out_dir) / MANIFEST}")
    return "\n".join(lines)
