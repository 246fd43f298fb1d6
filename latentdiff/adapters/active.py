"""What a pipeline holds on top of its base weights: merged LoRAs (persistent ones, and per-call prompt tags),
the parsed LoRA files, where tags look for them, and textual-inversion embeddings."""
from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from . import tags
from .embeddings import Embedding
from .lora import LoraFile, LoraStack, read_lora


class ActiveAdapters:
    def __init__(self, unet: nn.Module, text_encoders: nn.ModuleList):
        self.stack = LoraStack(unet, text_encoders)  # merged LoRAs, undone exactly
        self.lora_dirs: list[Path] = []  # where <lora:NAME:W> tags look (latentdiff.load sets them)
        self.embeddings: dict[str, Embedding] = {}  # textual inversion: name -> vectors, usable in prompts
        # parsed files and their A1111 short hash, by path, with the mtime they were read at
        self._files: dict[Path, tuple[float | None, LoraFile, str]] = {}

    def _cached(self, path) -> tuple[float | None, LoraFile, str]:
        """Read, parse and hash once per path (again if the file changed): switching LoRAs re-reads nothing."""
        path = Path(path)
        mtime = path.stat().st_mtime if path.exists() else None
        hit = self._files.get(path)
        if hit is None or hit[0] != mtime:
            f = read_lora(path)
            self._files[path] = hit = (mtime, f, tags.short_hash(path))
        return hit

    def lora_file(self, path) -> LoraFile:
        return self._cached(path)[1]

    @contextlib.contextmanager
    def prompt_loras(self, texts: list[str], changed):
        """A1111's `<lora:NAME:W>` tags in `texts`: merged for the block, undone after it (`changed()` is called
        after each change of the weights). The first tag of a name decides its weights. Yields {name: A1111 short
        hash} of the files used, for the PNG's "Lora hashes"."""
        found: dict[str, tags.LoraTag] = {}
        for text in texts:
            for tag in tags.parse(text)[1]:
                found.setdefault(tag.name, tag)
        merged, hashes = [], {}
        try:
            for tag in found.values():
                _, f, hashes[tag.name] = self._cached(tags.find(tag.name, self.lora_dirs))
                self.stack.add(f, f"<lora:{tag.name}>", tag.unet, tag.te)
                merged.append(f"<lora:{tag.name}>")
            if merged:
                changed()
            yield hashes
        finally:
            for name in merged:
                self.stack.remove(name)
            if merged:
                changed()


def untagged(text):
    """The prompt (or list of prompts) without its `<lora:...>` tags."""
    if text is None or isinstance(text, str):
        return text if text is None else tags.parse(text)[0]
    return [tags.parse(t)[0] for t in text]
