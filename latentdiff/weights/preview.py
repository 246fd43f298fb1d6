"""Preview decoder files: ours (`<model>.preview.safetensors`, config in the metadata) and TAESD's released
decoders (`taesd_decoder.safetensors`, or diffusers' `AutoencoderTiny` file). The modules are in
`latentdiff/models/preview.py`."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.preview import PreviewConfig, PreviewDecoder, TAESDDecoder
from .io import CheckpointError, SafetensorsFile, write_safetensors
from .layout import check_keys



SUFFIX = ".preview.safetensors"  # a model's preview decoder lies next to it: emoji.preview.safetensors


def preview_path(model_path) -> Path:
    """Where the preview decoder of the single file `model_path` lies (x.safetensors -> x.preview.safetensors)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + SUFFIX)


def read_preview(path) -> nn.Module:
    """A preview decoder file -> the module, in fp32 on the CPU: ours (written by `save_preview`, config in the
    metadata) or a released TAESD decoder, either as `taesd*_decoder.safetensors` or as the diffusers
    `AutoencoderTiny` file (its `decoder.layers.N.*` are TAESD's `N+1.*`; the encoder's keys are not read).
    Keys and shapes are checked like a checkpoint's; nothing is half-loaded."""
    f = SafetensorsFile(path)
    shapes = f.shapes()
    if f.metadata.get("format") == "latentdiff-preview":
        try:
            model = PreviewDecoder(PreviewConfig.from_metadata(f.metadata))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: preview decoder metadata {f.metadata} lacks or garbles {e}") from e
        names = {k: k for k in shapes}
    elif "1.weight" in shapes or "decoder.layers.0.weight" in shapes:
        diffusers = "decoder.layers.0.weight" in shapes
        names = {(f"{int(k.split('.')[2]) + 1}." + k.split(".", 3)[3] if diffusers else k): k
                 for k in shapes if not diffusers or k.startswith("decoder.layers.")}
        first = shapes["decoder.layers.0.weight" if diffusers else "1.weight"]
        if len(first) != 4:
            raise CheckpointError(f"{path}: TAESD decoder's first conv weight has shape {list(first)}")
        model = TAESDDecoder(latent_channels=first[1], width=first[0])
    else:
        raise CheckpointError(f"{path}: not a preview decoder (no 'format: latentdiff-preview' in its metadata) "
                              "and not a TAESD decoder (no key '1.weight' or 'decoder.layers.0.weight')")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(path, want, {ours: shapes[theirs] for ours, theirs in names.items()})
    model.load_state_dict({k: f.get(names[k], torch.float32) for k in want})
    return model.eval().requires_grad_(False)


def save_preview(model: PreviewDecoder | TAESDDecoder, path, extra: dict[str, str] | None = None) -> None:
    """fp16 weights, as `read_preview` reads them: ours with its config in the metadata, a TAESD decoder in
    TAESD's own keys (its file is recognised by them)."""
    meta = {**model.cfg.to_metadata(), "format": "latentdiff-preview"} if isinstance(model, PreviewDecoder) else {}
    meta.update(extra or {})
    write_safetensors(path, {k: v.half().contiguous() for k, v in model.state_dict().items()}, meta)
