"""A1111's extra-network prompt tags: `<lora:NAME:W>`, `<lora:NAME:TE_W:UNET_W>`, `<lyco:...>` (an alias), and the
lookup of NAME in LoRA folders.

Parsing follows A1111's `modules/extra_networks.py` (shared/reference/wave2-formats.md 4.1-4.3): the regex
`<(\\w+):([^>]+)>`, arguments split at ":", `k=v` items named (`te=`, `unet=`), the rest positional; the tag is
replaced by "" so the spaces and commas around it stay. te defaults to 1.0 and unet to te. Names resolve to a file
stem, or to a file's `ss_output_name` metadata (kohya's output name, which A1111 registers as an alias), searched
recursively under each folder for `.safetensors`, `.pt`, `.ckpt`.

    parse("a <lora:foo:0.7>, cat <lora:bar:0.5:0.2>") -> ("a , cat ", [LoraTag("foo", 0.7, 0.7), LoraTag("bar", 0.5, 0.2)])
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import NamedTuple

_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_NETWORKS = ("lora", "lyco")
SUFFIXES = (".safetensors", ".pt", ".ckpt")


class LoraTag(NamedTuple):
    name: str
    te: float
    unet: float


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"prompt tag {tag!r}: {value!r} is not a number (expected <lora:NAME:WEIGHT> or "
                         "<lora:NAME:TE_WEIGHT:UNET_WEIGHT>)") from None


def parse(text: str) -> tuple[str, list[LoraTag]]:
    """Remove the LoRA tags from `text` -> (text without them, the tags in order). Other extra networks
    (`<hypernet:...>`) are not supported and raise, rather than being dropped silently."""
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        network, args = m.group(1), m.group(2).split(":")
        if network not in LORA_NETWORKS:
            raise ValueError(f"prompt tag {m.group(0)!r}: extra network {network!r} is not supported (only "
                             f"{' / '.join(f'<{n}:...>' for n in LORA_NETWORKS)})")
        named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        positional = [a for a in args[1:] if "=" not in a]
        unknown = set(named) - {"te", "unet"}
        if unknown or len(positional) > 2:
            raise ValueError(f"prompt tag {m.group(0)!r}: expected <lora:NAME:WEIGHT> or "
                             "<lora:NAME:TE_WEIGHT:UNET_WEIGHT> (or te=, unet=)")
        te = _number(named.get("te", positional[0] if positional else "1"), m.group(0))
        unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), m.group(0))
        tags.append(LoraTag(args[0].strip(), te, unet))
        return ""

    return _TAG.sub(take, text), tags


def _output_name(path: Path) -> str | None:
    """kohya's `ss_output_name` from a .safetensors header (read without mapping the file)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, struct.error, ValueError):
        return None  # an unreadable file is reported when it is loaded, by name
    return meta.get("ss_output_name")


def find(name: str, dirs: list[Path]) -> Path:
    """The LoRA file called `name` (stem or ss_output_name alias) under `dirs`, searched recursively."""
    looked = []
    for d in dirs:
        if not d.is_dir():
            continue
        looked.append(str(d))
        files = sorted(p for p in d.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        for p in files:
            if p.stem == name:
                return p
        for p in files:
            if _output_name(p) == name:
                return p
    raise FileNotFoundError(f"LoRA {name!r} not found (looked for {name}{'/'.join(SUFFIXES)} or a file whose "
                            f"ss_output_name is {name!r} under {looked or [str(d) for d in dirs] or 'no folder'}; "
                            "set lora_dir= or $LATENTDIFF_LORA_DIR)")


def short_hash(path: Path) -> str:
    """A1111's LoRA hash, the first 12 hex digits of a sha256: for `.safetensors` of the tensor bytes only
    (`hashes.addnet_hash_safetensors`: the header, where metadata lives, is skipped), else of the whole file."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]
