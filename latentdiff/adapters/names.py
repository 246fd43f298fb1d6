"""The names LoRA files use for our modules, both ways.

Our modules' paths are the released single-file keys, so the table is built from the model itself: each U-Net
Linear / Conv2d under its original and its diffusers name, each CLIP-L Linear under its transformers name, and
open_clip's blocks under the transformers names kohya uses (q / k / v are row blocks of the fused
``attn.in_proj_weight`` (3W, W); ``mlp.c_fc`` is ``mlp_fc1``, ``mlp.c_proj`` is ``mlp_fc2``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from latentdiff.weights.diffusers.unet import to_diffusers


@dataclass(frozen=True)
class Target:
    """Where a file's module lands: a module of one part, or (open_clip q / k / v) rows of its fused in_proj."""
    part: str  # "unet" | "text_encoders.0" | "text_encoders.1"
    module: str  # our module path inside the part, e.g. "input_blocks.1.1.proj_in" or "model...resblocks.0.attn"
    rows: tuple[int, int] | None = None  # [start, stop) rows of in_proj_weight / in_proj_bias

    @property
    def weight(self) -> str:
        return self.module + (".in_proj_weight" if self.rows else ".weight")

    @property
    def bias(self) -> str:
        return self.module + (".in_proj_bias" if self.rows else ".bias")


def table(unet: nn.Module, text_encoders) -> list[tuple[str, str, Target, bool]]:
    """(part, file-grammar name, target, is kohya's own spelling) for every module a LoRA can target."""
    sdxl = len(text_encoders) == 2
    out = []
    ours = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    theirs = {v: k[: -len(".weight")] for k, v in to_diffusers({n + ".weight": n for n in ours}, unet.cfg).items()}
    for n in ours:
        out.append(("unet", n.replace(".", "_"), Target("unet", n), sdxl))  # sd-scripts SDXL: original layout
        out.append(("unet", theirs[n].replace(".", "_"), Target("unet", n), not sdxl))  # SD 1/2: diffusers layout
    for i, te in enumerate(text_encoders):
        part = f"text_encoders.{i}"
        if te.cfg.kind == "clip":  # our paths are transformers' under "transformer.text_model."
            for n, m in te.named_modules():
                if isinstance(m, nn.Linear):
                    out.append((part, n.removeprefix("transformer.text_model.").replace(".", "_"), Target(part, n), True))
            continue
        w = te.cfg.width
        for j in range(te.cfg.layers):
            block, name = f"model.transformer.resblocks.{j}.", f"encoder_layers_{j}_"
            for k, proj in enumerate("qkv"):  # in_proj_weight (3W, W): rows q, k, v
                out.append((part, f"{name}self_attn_{proj}_proj", Target(part, block + "attn", (k * w, k * w + w)), True))
            for theirs_, ours_ in (("self_attn_out_proj", "attn.out_proj"), ("mlp_fc1", "mlp.c_fc"),
                                   ("mlp_fc2", "mlp.c_proj")):
                out.append((part, name + theirs_, Target(part, block + ours_), True))
    return out


def kohya_names(unet: nn.Module, text_encoders) -> dict[Target, str]:
    """Our module -> the kohya name sd-scripts would write for it (``lora_unet_...``, ``lora_te1_...``), key stem
    without the ``.lora_down.weight`` suffix: the inverse of the table `LoraStack` reads files with."""
    te = ["lora_te_"] if len(text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
    return {t: ("lora_unet_" + name if part == "unet" else te[int(part[-1])] + "text_model_" + name)
            for part, name, t, own in table(unet, text_encoders) if own}


def model_arch(unet: nn.Module, text_encoders) -> str:
    fam = ("SDXL" if len(text_encoders) == 2 else "SD 2.x" if text_encoders[0].cfg.kind == "open_clip" else "SD 1.x")
    return f"{fam} ({unet.cfg.context_dim}-wide context)"
