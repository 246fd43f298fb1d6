"""LoRA / LoCon training on a frozen model (Hu et al. 2021, arXiv:2106.09685), as kohya's sd-scripts trains it
(``networks/lora.py``), written as kohya writes it, so A1111, ComfyUI and diffusers load the file as theirs.

Targets (kohya's ``create_modules``): every Linear / Conv2d inside the U-Net's transformer blocks (kohya's
``Transformer2DModel``, our ``SpatialTransformer``); with LoCon also inside the ResBlocks and down / up samplers
(kohya's ``conv_dim``: 3x3 convs get conv_rank / conv_alpha, Linears and 1x1 convs rank / alpha); in the text
encoders the attention and MLP Linears (q / k / v are row blocks of open_clip's fused ``in_proj_weight``). The
names are the loader's (adapters/names.py), so what is written is exactly what is read back.

Each module (kohya ``LoRAModule``): down (r, in[, kh, kw]) with the base's stride and padding, up (out, r[, 1, 1]),
    y = W x + alpha / r * up(dropout(down(x)))
down starts kaiming-uniform(a=sqrt(5)) and up at zero, so training starts from the base model. The down / up
pair runs as a forward hook on the untouched base module (module paths, hence the base's keys, stay the same);
for open_clip's attention (nn.MultiheadAttention reads in_proj_weight and out_proj.weight without calling a module)
the deltas alpha / r * up @ down are added to the weights' row blocks instead (a parametrization; network dropout
does not apply there).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from latentdiff.adapters.names import Target, kohya_names
from latentdiff.models.layers import Downsample, ResBlock, SpatialTransformer, Upsample
from latentdiff.weights import write_safetensors
from latentdiff.weights.diffusers.unet import to_diffusers

from .config import NetworkConfig, TrainConfig
from .objective import UNetTrainer

log = logging.getLogger("latentdiff.train")

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoRAModule(nn.Module):
    """One module's adapter: ``lora_down``, ``lora_up`` (kohya's key names) and its scale alpha / rank."""

    def __init__(self, base: nn.Module | tuple[int, int], rank: int, alpha: float, dropout: float):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            inp, out = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base
            self.lora_down, self.lora_up = nn.Linear(inp, rank, bias=False), nn.Linear(rank, out, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's (and torch's Linear) init
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha, self.scale, self.dropout = rank, alpha, alpha / rank, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(x.to(self.lora_down.weight.dtype))  # (..., r) or (B, r, H', W')
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return self.lora_up(h) * self.scale

    def delta(self) -> torch.Tensor:
        """alpha / r * up @ down, (out, in): the merged form (Linear only)."""
        return self.lora_up.weight @ self.lora_down.weight * self.scale


class _Delta(nn.Module):
    """Parametrization of a weight nn.MultiheadAttention uses without calling a module (open_clip's fused
    in_proj_weight (3W, W) and out_proj.weight): the adapters' deltas on its row blocks (q / k / v, or all rows).
    The adapters are held by reference, not as children, so they stay parameters of the network only."""

    def __init__(self, rows: list[tuple[tuple[int, int], LoRAModule]]):
        super().__init__()
        self._rows = rows

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        parts, at = [], 0
        for (start, stop), m in sorted(self._rows, key=lambda r: r[0]):
            parts += [w[at:start], w[start:stop] + m.delta().to(w.dtype)]
            at = stop
        return torch.cat([*parts, w[at:]])


def select(unet: nn.Module, encoders, net: NetworkConfig) -> dict[str, tuple[Target, nn.Module, int, float]]:
    """{kohya name: (target, base module, rank, alpha)} of what `net` trains, in the model's module order."""
    blocks = (SpatialTransformer,) + ((ResBlock, Downsample, Upsample) if net.type == "locon" else ())
    inside = {f"{n}.{c}" for n, m in unet.named_modules() if isinstance(m, blocks)
              for c, child in m.named_modules() if isinstance(child, (nn.Linear, nn.Conv2d))}
    out = {}
    for t, stem in kohya_names(unet, encoders).items():
        if t.part == "unet":
            if "unet" not in net.targets or t.module not in inside:
                continue
            base = unet.get_submodule(t.module)
        else:
            if "text_encoder" not in net.targets or ("encoder.layers." not in t.module and "resblocks." not in t.module):
                continue
            base = encoders[int(t.part[-1])].get_submodule(t.module)
        conv = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
        rank = (net.conv_rank or net.rank) if conv else net.rank
        alpha = (net.alpha if net.conv_alpha is None else net.conv_alpha) if conv else net.alpha
        out[stem] = (t, base, rank, alpha)
    if not out:
        raise ValueError(f"network {net.type} with targets {list(net.targets)} selects no module of this model")
    return out


class LoRANetwork(nn.Module):
    """The adapters by kohya name (``loras.<name>.lora_down.weight``), attached to the frozen model they train."""

    def __init__(self, unet: nn.Module, encoders, net: NetworkConfig):
        super().__init__()
        chosen = select(unet, encoders, net)
        self.loras = nn.ModuleDict()
        self.targets: dict[str, Target] = {}
        for stem, (t, base, rank, alpha) in chosen.items():
            shape = (base.in_proj_weight.shape[1], t.rows[1] - t.rows[0]) if t.rows else base
            self.loras[stem] = LoRAModule(shape, rank, alpha, net.dropout)
            self.targets[stem] = t
        self._bases = {stem: base for stem, (_, base, _, _) in chosen.items()}
        self._hooks: list = []

    def attach(self) -> None:
        """Route the base modules through the adapters (call after the network is on its device)."""
        fused: dict[nn.Module, list] = {}
        for stem, m in self.loras.items():
            base, t = self._bases[stem], self.targets[stem]
            if t.rows:
                fused.setdefault(base, []).append((t.rows, m))
            elif t.module.endswith("attn.out_proj"):  # nn.MultiheadAttention reads its weight, never calls it
                fused.setdefault(base, []).append(((0, base.out_features), m))
            else:
                self._hooks.append(base.register_forward_hook(lambda mod, args, out, m=m: out + m(args[0]).to(out.dtype)))
        for mod, rows in fused.items():
            name = "in_proj_weight" if isinstance(mod, nn.MultiheadAttention) else "weight"
            parametrize.register_parametrization(mod, name, _Delta(rows), unsafe=True)

    def kohya_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """kohya's keys: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha`` (0-dim)."""
        sd = {}
        for stem, m in self.loras.items():
            sd[f"{stem}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype).contiguous()
            sd[f"{stem}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype).contiguous()
            sd[f"{stem}.alpha"] = torch.tensor(float(m.alpha), dtype=dtype)
        return sd

    def peft_state_dict(self, unet: nn.Module, encoders, dtype: torch.dtype) -> tuple[dict, dict]:
        """(tensors, lora_adapter_metadata) in diffusers' PEFT format: ``unet.<diffusers path>.lora_A.weight`` /
        ``lora_B.weight``, ``text_encoder[_2].text_model.<path>...``; ranks and alphas per module as PEFT's
        r / lora_alpha plus rank_pattern / alpha_pattern."""
        unet_paths = [t.module for t in self.targets.values() if t.part == "unet"]
        renamed = to_diffusers({p + ".weight": p for p in unet_paths}, unet.cfg) if unet_paths else {}
        dotted = {v: k[: -len(".weight")] for k, v in renamed.items()}
        sd, groups = {}, {}
        for stem, m in self.loras.items():
            t = self.targets[stem]
            if t.part == "unet":
                comp, name = "unet", dotted[t.module]
            elif encoders[int(t.part[-1])].cfg.kind == "clip":
                comp, name = ("text_encoder", "text_encoder_2")[int(t.part[-1])], t.module.removeprefix("transformer.")
            else:
                raise ValueError("save_format diffusers: LoRAs on OpenCLIP text encoders (SD 2.x, SDXL's second) "
                                 "are written in kohya's format only; use save_format kohya")
            sd[f"{comp}.{name}.lora_A.weight"] = m.lora_down.weight.detach().to("cpu", dtype).contiguous()
            sd[f"{comp}.{name}.lora_B.weight"] = m.lora_up.weight.detach().to("cpu", dtype).contiguous()
            # PEFT matches module names by suffix; transformers 5's CLIPTextModel has no "text_model." level
            groups.setdefault(comp, []).append((name.removeprefix("text_model."), m.rank, m.alpha))
        meta = {}
        for comp, mods in groups.items():
            r, a = mods[0][1], mods[0][2]  # the first module's; the others that differ go to the patterns
            meta |= {f"{comp}.r": r, f"{comp}.lora_alpha": a, f"{comp}.target_modules": [n for n, _, _ in mods],
                     f"{comp}.rank_pattern": {n: rr for n, rr, _ in mods if rr != r},
                     f"{comp}.alpha_pattern": {n: aa for n, _, aa in mods if aa != a}}
        return sd, meta


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them (``train_util.precalculate_safetensors_
    hashes``): the file serialised with its ss_* metadata only; the sha256 of its tensor bytes (after the header,
    A1111's ``addnet_hash_safetensors``), and the first 8 hex digits of the sha256 of the 64 KiB at 1 MiB
    (``addnet_hash_legacy``)."""
    b = io.BytesIO(safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    return model, hashlib.sha256(b.read(0x10000)).hexdigest()[:8]


def optimizer_name(tc: TrainConfig) -> str:
    """The optimizer class objective.adamw builds, as kohya's ss_optimizer names it."""
    import importlib.util

    if tc.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is not None:
        return "bitsandbytes.optim.adamw.AdamW8bit"
    return "torch.optim.adamw.AdamW"


def base_model_version(cfg) -> str:
    """kohya's ss_base_model_version: sd_v1 / sd_v2 (+ _v for v-prediction), sdxl_base_v1-0."""
    if cfg.family.startswith("sdxl"):
        return "sdxl_base_v1-0"
    v2 = cfg.text[0].kind == "open_clip"
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if cfg.prediction_type == "v_prediction" else "")


class WithNetwork(nn.Module):
    """The frozen model and the adapter as one module, so DDP wraps the adapter's parameters and syncs their
    gradients; its forward is the model's (the adapter is hooked into it)."""

    def __init__(self, inner: nn.Module, network: nn.Module):
        super().__init__()
        self.inner, self.network = inner, network

    def forward(self, *args):
        return self.inner(*args)


class LoRATrainer(UNetTrainer):
    """A LoRA / LoCon on the frozen U-Net (and text encoders), on the U-Net's diffusion loss. The base model is
    frozen and may sit in bf16 / fp16 (mixed_precision), the adapter trains in fp32; only the adapter reaches the
    optimizer, the EMA and the checkpoints."""

    def __init__(self, tc: TrainConfig, cfg, parts: dict[str, nn.Module], acc, dataset, bucket_of):
        if tc.save_format == "diffusers" and "text_encoder" in tc.network.targets and any(
                e.cfg.kind == "open_clip" for e in parts["text_encoders"]):
            raise ValueError("save_format diffusers: LoRAs on OpenCLIP text encoders (SD 2.x, SDXL's second) are "
                             "written in kohya's format only; use save_format kohya or network.targets [unet]")
        torch.manual_seed(tc.seed)  # the adapter's init, the same on every rank; then the dropout masks' draws
        self.network = LoRANetwork(parts["unet"], parts["text_encoders"], tc.network)
        self.network.to(acc.device, torch.float32)
        super().__init__(tc, cfg, parts, acc, dataset, bucket_of, trained={"network": self.network})
        self.network.attach()
        self.model = WithNetwork(self.model, self.network)
        self.started_at = time.time()  # kohya's ss_training_started_at, kept across resumes
        self.num_images = len(dataset)
        self.export_name = f"{tc.run_name}.safetensors"  # A1111's <lora:NAME:W> finds it by stem
        n = sum(p.numel() for p in self.params.values())
        log.info("network %s: %d modules, %d trainable parameters (rank %d, alpha %g)", tc.network.type,
                 len(self.network.loras), n, tc.network.rank, tc.network.alpha)

    def flops_per_sample(self) -> int:
        # the frozen U-Net may be in bf16 / fp16; network dropout must not draw from the RNG a resume restored
        with self.acc.autocast(), torch.random.fork_rng(devices=[]):
            return super().flops_per_sample()

    def param_groups(self) -> list[dict]:
        unet = [p for n, p in self.params.items() if ".lora_unet_" in n]
        te = [p for n, p in self.params.items() if ".lora_unet_" not in n]
        groups = [{"params": unet, "lr": self.tc.lr}] if unet else []
        return groups + ([{"params": te, "lr": self.tc.text_encoder_lr or self.tc.lr}] if te else [])

    def preview(self, out: Path) -> None:
        self.network.eval()  # no dropout in the samples; train_mode (in super) turns it back on
        super().preview(out)

    def state_dict(self) -> dict:
        # the adapter only: the frozen model is the init file's, and every rank holds the same adapter
        return {"model": {"network": {k: v.detach().cpu() for k, v in self.network.state_dict().items()}},
                "lora_started_at": self.started_at}

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["model"]["network"])
        self.started_at = state["lora_started_at"]

    def metadata(self, steps: int) -> dict[str, str]:
        tc, net = self.tc, self.tc.network
        args = {"conv_dim": str(net.conv_rank or net.rank),
                "conv_alpha": str(net.alpha if net.conv_alpha is None else net.conv_alpha)} if net.type == "locon" else {}
        return {
            "ss_network_module": "networks.lora", "ss_network_dim": str(net.rank), "ss_network_alpha": str(net.alpha),
            "ss_network_dropout": str(net.dropout), **({"ss_network_args": json.dumps(args)} if args else {}),
            "ss_base_model_version": base_model_version(self.cfg), "ss_v2": str(self.cfg.text[0].kind == "open_clip"),
            "ss_v_parameterization": str(self.cfg.prediction_type == "v_prediction"),
            "ss_resolution": f"({tc.resolution}, {tc.resolution})", "ss_num_train_images": str(self.num_images),
            "ss_steps": str(steps), "ss_max_train_steps": str(tc.steps),
            "ss_training_started_at": str(self.started_at), "ss_training_finished_at": str(time.time()),
            "ss_output_name": tc.run_name, "ss_learning_rate": str(tc.lr),
            "ss_text_encoder_lr": str(tc.text_encoder_lr or tc.lr), "ss_unet_lr": str(tc.lr),
            "ss_batch_size_per_device": str(tc.batch_size), "ss_gradient_accumulation_steps": str(tc.grad_accum),
            "ss_mixed_precision": tc.mixed_precision, "ss_seed": str(tc.seed), "ss_lr_warmup_steps": str(tc.warmup_steps),
            "ss_lr_scheduler": "cosine", "ss_optimizer": optimizer_name(tc), "ss_max_grad_norm": str(tc.max_grad_norm),
            "ss_min_snr_gamma": str(tc.min_snr_gamma), "ss_noise_offset": str(tc.offset_noise),
            "ss_caption_dropout_rate": str(tc.caption_dropout), "ss_gradient_checkpointing": str(tc.gradient_checkpointing),
            "ss_network_train_unet_only": str("text_encoder" not in net.targets),
            "ss_network_train_text_encoder_only": str("unet" not in net.targets),
            "ss_sd_model_name": Path(tc.init_from).name if tc.init_from else tc.model,
        }

    def export(self, path: Path, metadata: dict[str, str]) -> None:
        dtype = SAVE_DTYPES[self.tc.save_precision]
        if self.tc.save_format == "diffusers":
            tensors, peft = self.network.peft_state_dict(self.unet, self.encoders, dtype)
            write_safetensors(path, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(peft), **metadata})
            return
        tensors = self.network.kohya_state_dict(dtype)
        meta = {**metadata, **self.metadata(int(metadata.get("training_steps", self.tc.steps)))}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
        write_safetensors(path, tensors, meta)
