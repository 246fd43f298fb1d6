"""Textual-inversion embeddings (Gal et al. 2022, arXiv:2208.01618): learned token vectors, used by name in prompts.

    emb = read_embedding("embeddings/EasyNegative.safetensors")    # Embedding("EasyNegative", [(n, 768)])
    check(emb, pipe.cfg.text)                                      # CheckpointError on another model's file
    encode_prompts(tok, encoders, ["a cat"], ["EasyNegative"], embeddings={emb.token: emb})

File formats (shared/reference/wave2-formats.md 5.1), each read as one float32 (n, W) tensor per text encoder:
  A1111 .pt              {"string_to_param": {"*": [n, W]}, "string_to_token", "name", "step", ...}
  kohya / A1111 .safetensors (or .pt)   {"emb_params": [n, W]}
  SDXL (kohya)           {"clip_l": [n, 768], "clip_g": [n, 1280]} -> [clip_l, clip_g] for encoders 0 and 1
  diffusers              learned_embeds.bin / .safetensors: {token: [W] or [n, W]}
Pickles (.pt, .bin) are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a file
whose pickle would run code is refused before anything in it runs.

Token: A1111's convention, the file stem (embeddings/EasyNegative.pt is typed ``EasyNegative``); a file named
``learned_embeds.*`` (diffusers' fixed name, which says nothing) takes its single key instead, as diffusers does.
How the token is found in a prompt and how its n vectors take n positions: see prompt.py.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.config import TextEncoderConfig
from latentdiff.weights import CheckpointError, SafetensorsFile

log = logging.getLogger("latentdiff")

EXTENSIONS = (".pt", ".bin", ".safetensors")  # A1111 also reads embeddings hidden in PNG / WebP images; we don't
MAX_VECTORS = 75  # one chunk: A1111 never splits an embedding over two chunks


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding: ``token`` as typed in prompts, and one (n, W_i) tensor per text encoder
    (SD 1.x / 2.x: one; SDXL: clip_l then clip_g). ``source`` names the file in error messages."""

    token: str
    vectors: list[torch.Tensor]
    source: str = "embedding"

    def __post_init__(self):
        if not self.token.strip():
            raise ValueError(f"{self.source}: an embedding token must not be empty")
        shapes = [tuple(v.shape) for v in self.vectors]
        if not shapes or any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
            raise ValueError(f"{self.source}: embedding vectors must be (n, width) tensors with the same n for "
                             f"every text encoder, got shapes {shapes}")
        if not 1 <= shapes[0][0] <= MAX_VECTORS:
            raise ValueError(f"{self.source}: an embedding must have 1 to {MAX_VECTORS} vectors (one 75-token "
                             f"chunk), got {shapes[0][0]}")

    @property
    def n(self) -> int:
        """Token positions the embedding takes in a prompt."""
        return self.vectors[0].shape[0]


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: torch.load(weights_only=True), which reads only tensors and plain "
            f"containers, rejects this pickle ({e}). Pickles can run arbitrary code, so latentdiff never loads "
            "them unrestricted; if you trust the file, convert it to .safetensors once, in a sandbox") from e
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path}: cannot read as a torch file: {e}") from e


def _read_dict(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        f = SafetensorsFile(path)
        return {k: f.get(k) for k in f.entries}  # views of the mapping: copied by _vectors
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a textual-inversion embedding: expected a dict, found "
                              f"{type(data).__name__}")
    return data


def _vectors(data: dict, path: Path) -> tuple[list[torch.Tensor], str]:
    """The per-encoder tensors of a file's dict, and its own token name (A1111's detection order, 5.2)."""
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{path}: 'string_to_param' must hold exactly one tensor, found "
                                  f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        tensors, key = list(params.values()), ""
    elif "clip_l" in data and "clip_g" in data:  # SDXL: our encoder order is CLIP-L, then bigG
        tensors, key = [data["clip_l"], data["clip_g"]], ""
    elif len(data) == 1:  # diffusers {token: vector}, kohya {"emb_params": ...}
        (key, t), = data.items()
        tensors = [t]
    else:
        raise CheckpointError(f"{path}: not a textual-inversion embedding: expected 'string_to_param', "
                              f"'clip_l' + 'clip_g', or a single tensor; found keys {sorted(map(str, data))[:10]}")
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2):
            raise CheckpointError(f"{path}: embedding vectors must be a float tensor [n, width] or [width], "
                                  f"found {getattr(t, 'shape', type(t).__name__)}")
        out.append(t.detach().reshape(-1, t.shape[-1]).to(torch.float32, copy=True))  # [W] -> (1, W)
    return out, str(key)


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """Read a textual-inversion file (.pt, .bin, .safetensors; any format above).

    token: the word that stands for it in prompts; None = the file stem (the single key for learned_embeds.*).
    Raises CheckpointError naming the file for an unreadable, unsafe or unrecognised file.
    """
    path = Path(path)
    if path.suffix.lower() not in EXTENSIONS:
        raise CheckpointError(f"{path}: an embedding file must end in one of {', '.join(EXTENSIONS)}")
    vectors, key = _vectors(_read_dict(path), path)
    if token is None:
        token = key if path.stem == "learned_embeds" and key else path.stem
    try:
        return Embedding(token, vectors, str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _widths(widths: list[int]) -> str:
    return " + ".join(map(str, widths)) + (" (clip_l + clip_g)" if len(widths) == 2 else "")


def check(embedding: Embedding, text_configs: tuple[TextEncoderConfig, ...] | list[TextEncoderConfig]) -> None:
    """Raise CheckpointError unless the embedding has one vector set per text encoder, each of its width.

    An SD 1.x file (768) on SD 2.x (1024) or SDXL (768 + 1280), or the reverse, fails here with both widths named.
    """
    found = [v.shape[1] for v in embedding.vectors]
    expected = [c.width for c in text_configs]
    if found != expected:
        raise CheckpointError(
            f"{embedding.source}: textual-inversion embedding {embedding.token!r} has vectors of width "
            f"{_widths(found)}, but this model's text encoder(s) expect width {_widths(expected)}: it was "
            "trained for another model family")


def scan_dir(directory: str | os.PathLike) -> dict[str, Path]:
    """``{name: path}`` of the embedding files under ``directory`` (recursive, A1111's embeddings/ convention):
    name = file stem, extensions .pt / .bin / .safetensors in any case; hidden and empty files are skipped (A1111).
    Two files with one stem: the first in sorted path order is kept, with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"embeddings_dir must be a directory, got {str(directory)!r}")
    found: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if (path.suffix.lower() not in EXTENSIONS or path.name.startswith(".") or not path.is_file()
                or path.stat().st_size == 0):
            continue
        if path.stem in found:
            log.warning("embedding %r: %s ignored, %s has the same name", path.stem, path, found[path.stem])
            continue
        found[path.stem] = path
    return found


def load_dir(directory: str | os.PathLike,
             text_configs: tuple[TextEncoderConfig, ...] | list[TextEncoderConfig]) -> dict[str, Embedding]:
    """Every embedding in ``directory`` that fits the model, by name (file stem). Files for another model family
    or that cannot be read are skipped with a warning, as A1111 does: one folder often serves SD 1.x and SDXL."""
    loaded = {}
    for name, path in scan_dir(directory).items():
        try:
            emb = read_embedding(path, token=name)
            check(emb, text_configs)
        except CheckpointError as e:
            log.warning("embedding skipped: %s", e)
            continue
        loaded[name] = emb
    return loaded
