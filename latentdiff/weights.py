"""Read and write released checkpoints: single files (original CompVis / Stability layout) and safe `.ckpt`.

A single file is split by key prefix into the U-Net, VAE and text encoder(s); since our module paths equal the
original keys, each part loads with a prefix strip and a strict check. Modules are built with their parameters
on the meta device and take the file's tensors by assignment, so nothing is initialised twice and an fp16 file
stays fp16 (or goes straight to bf16) with no fp32 detour. `.safetensors` are memory-mapped: a tensor whose
dtype already matches is a view of the file (copy-on-write), not a copy.

diffusers folders: see `latentdiff/folders.py`; its rename tables live in `latentdiff/diffusers_format/`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import pickle
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from .config import SD15, SD21, SDXL, ModelConfig, with_inpainting

log = logging.getLogger("latentdiff")

CONFIG_KEY = "latentdiff_config"

# Single-file prefixes of each part, by family.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": ("cond_stage_model.",),
    "sd2": ("cond_stage_model.",),
    "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1."),
}

# Keys in released files that are not network weights (see shared/reference/checkpoint-layouts/README.md).
DDPM_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}


def is_ignored(key: str) -> bool:
    return key in DDPM_BUFFERS or key.startswith("model_ema.") or key.endswith("embeddings.position_ids")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the offending keys."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# --- safetensors, read ------------------------------------------------------------------------------------


class SafetensorsFile:
    """A memory-mapped .safetensors file. Validates the header against the file size before touching data,
    so a truncated or foreign file fails with a message instead of a crash deep inside a loader."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{self.path}: header claims {n} bytes but the file has only {size - 8} after the length "
                    "field: truncated, or not a safetensors file")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: header is not valid JSON ({e}); not a safetensors file") from e
            if not isinstance(header, dict):
                raise CheckpointError(f"{self.path}: header is not a JSON object; not a safetensors file")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._base = 8 + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, e in header.items():
                try:
                    dtype = _ST_DTYPES[e["dtype"]]
                    shape = tuple(int(s) for s in e["shape"])
                    start, end = (int(o) for o in e["data_offsets"])
                except (KeyError, TypeError, ValueError) as err:
                    raise CheckpointError(f"{self.path}: malformed header entry for key {key!r}: {e!r}") from err
                if self._base + end > size:
                    raise CheckpointError(
                        f"{self.path}: tensor {key!r} ends at byte {self._base + end} but the file has {size} "
                        "bytes: the file is truncated")
                numel = 1
                for s in shape:
                    numel *= s
                if end - start != numel * dtype.itemsize:
                    raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes for shape {shape}")
                self.entries[key] = (dtype, shape, start, end)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._viewed: set[str] = set()  # keys handed out as views of the mapping: their pages are never dropped

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e[1] for k, e in self.entries.items()}

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key``; a view of the mapped file when no conversion is needed (copy-on-write)."""
        src, shape, start, end = self.entries[key]
        convert = dtype is not None and src.is_floating_point and src != dtype
        if end == start:
            return torch.empty(shape, dtype=src)
        a, b = self._base + start, self._base + end
        t = torch.frombuffer(memoryview(self._mm)[a:b], dtype=src).reshape(shape)
        if not convert:
            if a % src.itemsize:
                return t.clone()  # misaligned view: vectorised kernels want aligned data
            self._viewed.add(key)
            return t
        out = t.to(dtype)
        # Converting from the mapping, then dropping the pages read, is faster than reading into a buffer
        # (SD 1.5 fp16 -> bf16: 1.1-1.2 s vs 1.8-1.9 s) and keeps peak RSS at the converted copy alone: the
        # mapped pages would otherwise stay resident (4.7 GB peak instead of 2.6). Only pages wholly inside this
        # tensor are dropped, and not if the key was also handed out as a (writable, copy-on-write) view.
        lo, hi = -(-a // mmap.PAGESIZE) * mmap.PAGESIZE, b // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and key not in self._viewed and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return out


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A pickled .ckpt / .pt, through torch.load(weights_only=True): tensors and plain containers only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs globals outside torch's safe list ({e}). Pickles can "
            "run arbitrary code, so latentdiff never loads them unrestricted. If you trust the file, convert it "
            "once in a sandbox: python -c \"import torch, safetensors.torch as s; "
            "sd = torch.load('IN.ckpt', weights_only=False)['state_dict']; "
            "s.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, 'OUT.safetensors')\""
        ) from e
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# --- detection --------------------------------------------------------------------------------------------


def detect(shapes: dict[str, tuple[int, ...]], path: Path | str = "checkpoint") -> ModelConfig:
    """Architecture from key names and shapes alone: SD1, SD2, SDXL, each optionally 9-channel inpainting."""
    if "conditioner.embedders.1.model.token_embedding.weight" in shapes:
        cfg = SDXL
    elif "cond_stage_model.model.token_embedding.weight" in shapes:
        cfg = SD21
    elif "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes:
        cfg = SD15
    else:
        roots = sorted({".".join(k.split(".")[:2]) for k in shapes})
        raise CheckpointError(
            f"{path}: unknown checkpoint layout: no SD1 (cond_stage_model.transformer.*), SD2 "
            f"(cond_stage_model.model.*) or SDXL (conditioner.embedders.*) text encoder keys. Found {len(shapes)} "
            f"tensors under: {roots[:20]}. Pass config= (a preset name or a YAML file) if this is a custom model.")
    w = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if w is not None and w[1] == 9:
        cfg = with_inpainting(cfg)
    return cfg


def resolve_prediction_type(cfg: ModelConfig, argument: str | None, config_from: str | None,
                            metadata: dict, get) -> ModelConfig:
    """eps vs v: the argument, then a config (given by the caller or stored in the file), then the file's
    `prediction_type` metadata, then a documented default. Logs which it used and why.

    The default is epsilon, except for SD 2.x files, where ComfyUI's weight rule applies: the 768-v models have
    a wide spread in one LayerNorm bias (std of output_blocks.11.1.transformer_blocks.0.norm1.bias > 0.09)."""
    if argument is not None:
        if argument not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {argument!r}")
        pt, why = argument, "the prediction_type argument"
    elif config_from is not None:
        pt, why = cfg.prediction_type, config_from
    elif metadata.get("prediction_type") in ("epsilon", "v_prediction"):
        pt, why = metadata["prediction_type"], "the file's 'prediction_type' metadata"
    elif cfg.family == "sd2":
        b = get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias").float()
        pt = "v_prediction" if b.std(unbiased=False) > 0.09 else "epsilon"
        why = "the SD 2.x weight rule (norm1.bias std > 0.09 means v); pass prediction_type= to override"
    else:
        pt, why = "epsilon", f"the default for {cfg.family} checkpoints; pass prediction_type= to override"
    log.info("prediction_type=%s, decided by %s", pt, why)
    return replace(cfg, prediction_type=pt)


# --- building and loading modules -------------------------------------------------------------------------


def build_modules(cfg: ModelConfig, meta: bool = True) -> dict:
    """{"unet", "vae", "text_encoders"}; with meta=True the parameters live on the meta device (buffers such
    as position ids and attention masks are real) and must be filled by `load_parts`."""
    from .models.text import build_text_encoder
    from .models.unet import UNetModel
    from .models.vae import AutoencoderKL

    with init_empty_weights(include_buffers=False) if meta else contextlib.nullcontext():
        return {
            "unet": UNetModel(cfg.unet),
            "vae": AutoencoderKL(cfg.vae),
            "text_encoders": nn.ModuleList(build_text_encoder(t) for t in cfg.text),
        }


def part_prefixes(cfg: ModelConfig) -> list[tuple[str, str]]:
    """[(part name, key prefix)], e.g. ("text_encoders.1", "conditioner.embedders.1.")."""
    return [("unet", UNET_PREFIX), ("vae", VAE_PREFIX)] + [
        (f"text_encoders.{i}", p) for i, p in enumerate(TEXT_PREFIXES[cfg.family])]


def expected_shapes(cfg: ModelConfig, modules: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every key a single file of this config must hold, with its shape (computed on the meta device)."""
    modules = modules or build_modules(cfg)
    root = nn.ModuleDict({"unet": modules["unet"], "vae": modules["vae"], "text_encoders": modules["text_encoders"]})
    out = {}
    for part, prefix in part_prefixes(cfg):
        for k, v in root.get_submodule(part).state_dict().items():
            out[prefix + k] = tuple(v.shape)
    return out


def check_keys(path, expected: dict, found: dict) -> None:
    """Raise one CheckpointError naming every missing, unexpected or mis-shaped key (first 10 of each)."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not is_ignored(k))
    wrong = sorted(f"{k}: expected {list(expected[k])}, file has {list(found[k])}"
                   for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if keys:
            problems.append(f"{len(keys)} {what}: " + "; ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
    if problems:
        raise CheckpointError(f"{path}: does not match the {len(expected)}-tensor layout it was detected as: "
                              + " | ".join(problems))


@contextlib.contextmanager
def read_in_background(jobs: dict):
    """Run `jobs` ({name: function returning a tensor}) on one worker thread while the caller goes on building
    modules; yields a function that waits for them and returns {name: tensor}.

    Why: building the modules imports transformers' CLIP (~4 s of Python, GIL-bound) and converting the weights
    (SD 1.5 fp16 -> fp32: ~2.3 s, mostly first-touch page faults and the cast, both outside the GIL) is
    independent of it, so on 2 cores the two overlap. Leaving the block early (an error) stops the worker after
    its current tensor; the block never returns before the worker has ended."""
    stop = threading.Event()

    def run() -> dict:
        out = {}
        for name, job in jobs.items():
            if stop.is_set():
                break
            out[name] = job()
        return out

    with ThreadPoolExecutor(1, thread_name_prefix="latentdiff-read") as pool:
        future = pool.submit(run)
        try:
            yield future.result
        finally:
            stop.set()


def load_parts(cfg: ModelConfig, modules: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Fill the meta-device `modules` strictly from `tensors` (full single-file keys, already in the target dtype
    and on the device), popping each as it is assigned so no tensor is referenced twice."""
    root = nn.ModuleDict({"unet": modules["unet"], "vae": modules["vae"], "text_encoders": modules["text_encoders"]})
    for part, prefix in part_prefixes(cfg):
        mod = root.get_submodule(part)
        mod.load_state_dict({k: tensors.pop(prefix + k) for k in mod.state_dict()}, strict=True, assign=True)


def read_single_file(path, config=None, prediction_type=None, dtype=None, device="cpu"):
    """Open a `.safetensors` / `.ckpt` single file -> (resolved ModelConfig, modules dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = read_ckpt(path)
        shapes, metadata = {k: tuple(v.shape) for k, v in sd.items()}, {}

        def get(key, dtype=None):
            t = sd[key]
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    else:
        f = SafetensorsFile(path)
        shapes, metadata = f.shapes(), f.metadata
        get = f.get
    config_from = None
    if config is not None:
        cfg, config_from = config, "the config argument"
    elif CONFIG_KEY in metadata:
        try:
            cfg = ModelConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: metadata '{CONFIG_KEY}' is not a valid config: {e}") from e
        config_from = "the config stored in the file"
    else:
        cfg = detect(shapes, path)
        log.info("detected %s from the key layout of %s", cfg.name, path)
    # each tensor goes to the device as it is read: a GPU load never holds the whole model on the host
    jobs = {k: (lambda k=k: get(k, dtype).to(device)) for k in shapes if not is_ignored(k)}
    with read_in_background(jobs) as tensors:
        modules = build_modules(cfg)
        check_keys(path, expected_shapes(cfg, modules), shapes)
        cfg = resolve_prediction_type(cfg, prediction_type, config_from, metadata, get)
        read = tensors()
    load_parts(cfg, modules, read)
    return cfg, modules


# --- writing ----------------------------------------------------------------------------------------------


def state_dict_of(cfg: ModelConfig, modules: dict) -> dict[str, torch.Tensor]:
    root = nn.ModuleDict({"unet": modules["unet"], "vae": modules["vae"], "text_encoders": modules["text_encoders"]})
    out = {}
    for part, prefix in part_prefixes(cfg):
        for k, v in root.get_submodule(part).state_dict().items():
            out[prefix + k] = v
    return out


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic: write to a temporary name in the same folder, fsync, then rename over `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_single_file(path, cfg: ModelConfig, modules: dict, dtype: torch.dtype | None = None,
                     extra_metadata: dict | None = None) -> None:
    sd = state_dict_of(cfg, modules)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    write_safetensors(path, sd, {CONFIG_KEY: cfg.to_json(), "format": "pt", **(extra_metadata or {})})
