"""LoRA files in every common format, merged into the model's weights and undone bit for bit.

Formats (key grammar per module; facts in shared/reference/wave2-formats.md sections 1-3):
  kohya (sd-scripts ``networks/lora.py``)  ``lora_unet_<path>`` / ``lora_te_<path>`` (SD 1/2) / ``lora_te1_``,
      ``lora_te2_`` (SDXL), every "." of the module path written "_"; U-Net paths are diffusers' for SD 1/2 and the
      original layout's for SDXL (both are accepted for every model, as ComfyUI does: sd-scripts#1490); text
      encoder paths are transformers' CLIP names (``text_model_encoder_layers_0_self_attn_q_proj``).
  diffusers / PEFT  ``unet.<diffusers path>`` / ``text_encoder.`` / ``text_encoder_2.`` + ``lora_A.weight`` /
      ``lora_B.weight``, or the older ``lora.down.weight`` / ``lora_linear_layer.down.weight`` /
      ``processor.to_q_lora.down.weight`` forms; alpha from ``.alpha`` keys or the ``lora_adapter_metadata`` JSON.
  tensors per module: LoRA / LoCon ``lora_down`` (r, in[, kh, kw]) and ``lora_up`` (out, r[, 1, 1]) [+ Tucker
      ``lora_mid``]; LyCORIS LoHa ``hada_*``, LoKr ``lokr_*``, full ``diff`` / ``diff_b``; ``alpha``; ``dora_scale``.
Scale (kohya ``LoRAModule``, LyCORIS): alpha / r per module, r = the rank the tensors carry; no alpha (or 0) means
scale 1; LoKr with both factors whole and full diffs have scale 1. Merge: W' = W + m * scale * dW (dW from
lycoris.py), m the user's weight for the U-Net or the text encoders; DoRA modules re-normalise (lycoris.dora).

Every module name is looked up in a table built from the model (names.py).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff import speed
from latentdiff.adapters import lycoris
from latentdiff.adapters.names import Target, model_arch, table
from latentdiff.weights import CheckpointError, SafetensorsFile, read_ckpt

log = logging.getLogger("latentdiff")

# file suffix -> our name for the tensor (LoRA spellings of kohya, PEFT, old diffusers; LyCORIS names as is)
_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
             "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
             "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up"}
_SUFFIXES |= {s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                             "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff",
                             "diff_b", "alpha", "dora_scale")}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)
# tensors each kind needs / may have (besides alpha and dora_scale)
_KINDS = {"lora": ({"down", "up"}, {"mid"}),
          "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
          "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
          "full": ({"diff"}, {"diff_b"})}
_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoders.0"), ("lora_te2_", "text_encoders.1"),
             ("lora_te_", "text_encoders.0"), ("unet.", "unet"), ("text_encoder_2.", "text_encoders.1"),
             ("text_encoder.", "text_encoders.0"))
_PEFT_COMPONENT = {"unet": "unet", "text_encoders.0": "text_encoder", "text_encoders.1": "text_encoder_2"}
# diffusers' attention-processor era: `attn1.processor.to_q_lora.down.weight` is `attn1.to_q` (to_out: to_out.0)
_ATTN_PROC = re.compile(r"(\.processor)?\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
_TE_ATTN_PROC = re.compile(r"self_attn_to_(q|k|v|out)(?:_0)?$")  # -> self_attn_{q,k,v}_proj / self_attn_out_proj
_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # attn2.to_k input: the text context width


@dataclass
class Entry:
    """The tensors one file stores for one module. ``scale`` is alpha / rank under the rules above."""
    kind: str  # "lora" | "loha" | "lokr" | "full"
    tensors: dict[str, Tensor]  # our names: down / up / mid, hada_*, lokr_*, diff / diff_b (no alpha)
    keys: list[str]  # the file's keys, for messages
    alpha: float | None
    rank: int | None
    scale: float
    dora_scale: Tensor | None = None


@dataclass
class LoraFile:
    """A parsed LoRA file; model-independent, so it can be read once and applied to several pipelines."""
    path: Path
    format: str  # "kohya", "diffusers" or "kohya+diffusers"
    entries: dict[tuple[str, str], Entry]  # (part, module name with "_" for ".", no prefix, no "text_model_")
    problems: dict[str, str]  # key -> why it cannot be used (unknown tensor, incomplete module, ...)
    metadata: dict[str, str] = field(default_factory=dict)
    target: str = "unknown"  # "SD 1.x" | "SD 2.x" | "SDXL" | "unknown"
    evidence: list[str] = field(default_factory=list)  # why target was decided, e.g. ["lora_te2_ keys"]

    def describe_target(self) -> str:
        return self.target + (f" ({', '.join(self.evidence)})" if self.evidence else "")


# --- reading ----------------------------------------------------------------------------------------------


def read_lora(path) -> LoraFile:
    """Parse a LoRA file (.safetensors; .pt / .ckpt / .bin through torch.load(weights_only=True))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix in (".pt", ".ckpt", ".bin", ".pth"):
        tensors, metadata = read_ckpt(path), {}
    else:
        f = SafetensorsFile(path)
        tensors, metadata = {k: f.get(k).clone() for k in f.entries}, f.metadata
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    problems, formats, dotted = {}, set(), {}
    for key, t in tensors.items():
        k = _ATTN_PROC.sub(lambda m: f".{m[2]}{'.0' if m[2] == 'to_out' else ''}.lora.{m[3]}.weight", key)
        suffix = next((s for s in _BY_LENGTH if k.endswith("." + s)), None)
        if suffix is None:
            problems[key] = "not a LoRA / LyCORIS tensor name"
            continue
        stem = k[: -len(suffix) - 1]
        part, rest = next(((p, stem[len(pre):]) for pre, p in _PREFIXES if stem.startswith(pre)), ("unet", stem))
        formats.add("kohya" if stem.startswith("lora_") else "diffusers")
        name = rest.replace(".", "_")
        if part != "unet":
            name = _TE_ATTN_PROC.sub(lambda m: f"self_attn_{m[1] + '_proj' if m[1] in 'qkv' else 'out_proj'}",
                                     name.removeprefix("text_model_"))
        group = groups.setdefault((part, name), {})
        if _SUFFIXES[suffix] in group:
            problems[key] = f"a second {_SUFFIXES[suffix]} tensor for the module of {group[_SUFFIXES[suffix]][0]}"
            continue
        group[_SUFFIXES[suffix]] = (key, t)
        dotted[(part, name)] = rest  # PEFT alpha_pattern keys match dotted module names
    peft = _peft_configs(metadata)
    entries = {}
    for (part, name), group in groups.items():
        entry = _entry(group, peft.get(_PEFT_COMPONENT[part], {}), dotted[(part, name)], problems)
        if entry is not None:
            entries[(part, name)] = entry
    out = LoraFile(path, "+".join(sorted(formats)) or "unknown", entries, problems, metadata)
    out.target, out.evidence = _detect_target(out, tensors)
    return out


def _entry(group: dict[str, tuple[str, Tensor]], peft: dict, module: str, problems: dict) -> Entry | None:
    keys = [k for k, _ in group.values()]
    names = set(group) - {"alpha", "dora_scale"}
    kinds = [kind for kind, (need, may) in _KINDS.items() if names & (need | may)]
    why = None
    if len(kinds) != 1:
        why = "alpha / dora_scale without weights" if not kinds else f"mixes {' and '.join(kinds)} tensors"
    else:
        kind = kinds[0]
        t = {n: group[n][1] for n in names}
        if kind == "lokr":
            missing = [w for w in ("lokr_w1", "lokr_w2") if w not in t and not {w + "_a", w + "_b"} <= set(t)]
        else:
            missing = sorted(_KINDS[kind][0] - names) + (["hada_t1 and hada_t2"] if len({"hada_t1", "hada_t2"} & names) == 1 else [])
        if missing:
            why = f"incomplete {kind} module: no {', '.join(missing)}"
        a = group.get("alpha", (None, None))[1]
        if a is not None and a.numel() != 1:
            why = f"alpha has shape {list(a.shape)}, expected one number"
    if why:
        problems.update({k: why for k in keys})
        return None
    alpha, rank = (float(a) if a is not None else None), _rank(kind, t)
    root = math.sqrt if peft.get("use_rslora") else float
    if alpha is None and kind == "lora" and peft.get("lora_alpha") is not None:  # diffusers / PEFT metadata
        pattern = peft.get("alpha_pattern") or {}
        alpha = next((v for p, v in pattern.items() if re.match(rf"(.*\.)?({p})$", module)), peft["lora_alpha"])
        scale = alpha / root(rank)
    else:  # kohya / LyCORIS: missing or zero alpha means alpha = rank; LoKr with two whole factors: scale 1
        scale = alpha / rank if alpha and rank else 1.0
    ds = group.get("dora_scale", (None, None))[1]
    return Entry(kind, t, keys, alpha, rank, scale, ds)


def _rank(kind: str, t: dict[str, Tensor]) -> int | None:
    if kind == "lora":
        return t["down"].shape[0]
    if kind == "loha":
        return t["hada_w1_b"].shape[0]
    if kind == "lokr":  # ComfyUI weight_adapter/lokr.py: w2_b's rank, else w1_b's; two whole factors: scale 1
        b = t.get("lokr_w2_b", t.get("lokr_w1_b"))
        return None if b is None else b.shape[0]
    return None


def _peft_configs(metadata: dict) -> dict[str, dict]:
    """{component: LoraConfig dict} from diffusers' ``lora_adapter_metadata`` ("unet.r", "unet.lora_alpha", ...;
    a model-level file has unprefixed keys, taken as the U-Net's)."""
    try:
        cfg = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for k, v in cfg.items():
        comp, _, rest = k.partition(".")
        if comp in ("unet", "text_encoder", "text_encoder_2") and rest:
            out.setdefault(comp, {})[rest] = v
        else:
            out.setdefault("unet", {})[k] = v
    return out


def _detect_target(f: LoraFile, tensors: dict) -> tuple[str, list[str]]:
    """Which architecture a file was made for: second text encoder keys mean SDXL; else the width of the
    cross-attention context (attn2 to_k's input); else kohya's ss_* metadata."""
    evidence, votes = [], []
    for prefix in ("lora_te2_", "text_encoder_2."):
        if any(k.startswith(prefix) for k in tensors):
            evidence.append(f"{prefix} keys")
            votes.append("SDXL")
    ctx = None
    for (part, name), e in f.entries.items():
        if part == "unet" and name.endswith("attn2_to_k"):
            try:
                ctx = delta_shape(e)[1]
            except RuntimeError:  # inconsistent factors: reported when the file is applied
                continue
            break
    if ctx is not None:
        evidence.append(f"{ctx}-wide context")
        votes += [_CONTEXT_WIDTHS[ctx]] if ctx in _CONTEXT_WIDTHS else []
    base = f.metadata.get("ss_base_model_version", "")
    meta = ("SDXL" if base.startswith("sdxl") else "SD 2.x" if base.startswith("sd_v2") or
            f.metadata.get("ss_v2") == "True" else "SD 1.x" if base.startswith("sd_v1") else None)
    if meta:
        evidence.append(f"ss_base_model_version {base!r}" if base else "ss_v2 True")
        votes.append(meta)
    return (votes[0] if votes else "unknown"), evidence


# --- deltas -----------------------------------------------------------------------------------------------


def delta(e: Entry, device: torch.device | str | None = None) -> Tensor:
    """dW of one module in fp32, unscaled, before reshaping to the weight (see lycoris.py); device "meta" gives
    the shape without computing."""
    t = {k: v.to(device=device, dtype=torch.float32) for k, v in e.tensors.items()}
    if e.kind == "lora":
        up, down = t["up"].flatten(1), t["down"].flatten(1)  # (out, r), (r, in*kh*kw)
        if "mid" in t:  # LyCORIS LoCon Tucker: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)
            return lycoris.tucker(t["mid"], up.T, down)
        return (up @ down).reshape(t["up"].shape[0], *t["down"].shape[1:])
    if e.kind == "loha":
        return lycoris.loha(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                            t.get("hada_t1"), t.get("hada_t2"))
    if e.kind == "lokr":
        return lycoris.lokr(lycoris.lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b")),
                            lycoris.lokr_factor(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"),
                                                t.get("lokr_t2")))
    return t["diff"]


def delta_shape(e: Entry) -> tuple[int, ...]:
    return tuple(delta(e, "meta").shape)


def fit(d: Tensor, shape: torch.Size) -> Tensor:
    """dW reshaped to a weight of `shape`: equal shapes, or the same outputs and inputs with one side flat, i.e.
    a Linear LoRA on a 1x1 conv and back, or a (out, in*kh*kw) LoHa / LoKr delta on a kh x kw conv."""
    if tuple(d.shape) == tuple(shape):
        return d
    if (d.shape[0] == shape[0] and d.shape[1:].numel() == shape[1:].numel() and (d.dim() == 2 or len(shape) == 2)):
        return d.reshape(shape)
    raise ValueError(f"expected {list(shape)}, found {list(d.shape)}")


def merged(w: Tensor, e: Entry, multiplier: float) -> Tensor:
    """The new weight, fp32: W + m * scale * dW, or DoRA's re-normalised W + scale * dW (lycoris.dora)."""
    d = fit(delta(e, w.device), w.shape) * e.scale
    if e.dora_scale is not None:
        return lycoris.dora(w, d, e.dora_scale.to(w.device, torch.float32), multiplier)
    return w + multiplier * d


def lora_info(path) -> dict:
    """What a file holds, for ``latentdiff lora-info``: format, target architecture, kinds, ranks, alphas,
    modules per part, kohya's ss_* metadata, unusable keys."""
    f = path if isinstance(path, LoraFile) else read_lora(path)
    parts: dict[str, int] = {}
    for part, _ in f.entries:
        parts[part] = parts.get(part, 0) + 1
    es = f.entries.values()
    return {"path": str(f.path), "format": f.format, "target": f.target, "evidence": f.evidence,
            "kinds": sorted({e.kind + ("+dora" if e.dora_scale is not None else "") for e in es}),
            "modules": len(f.entries), "modules_per_part": parts,
            "ranks": sorted({e.rank for e in es if e.rank}), "alphas": sorted({e.alpha for e in es if e.alpha is not None}),
            "metadata": {k: v for k, v in f.metadata.items() if k.startswith("ss_")}, "unusable_keys": f.problems}


# --- merging ----------------------------------------------------------------------------------------------


class LoraStack:
    """LoRAs merged into a model's weights, each with its own U-Net and text-encoder weight, undone exactly.

    The first time a LoRA touches a tensor, a CPU copy of it is kept; removing restores every copy and merges the
    remaining LoRAs again in their order, so the result is bit for bit what loading only those would give. Each
    merge computes in fp32 and casts back to the weight's dtype. Everything a file needs is checked (names,
    shapes, on the meta device) before the first tensor changes; an error leaves the weights as they were.
    Packed convs (speed.pack_conv_weights) are unpacked before a merge touches them; the pipeline packs again on
    its next call. Callers holding results derived from the weights (prompt caches, compiled modules) must drop them.
    """

    def __init__(self, unet: nn.Module, text_encoders: nn.ModuleList):
        self.unet, self.text_encoders = unet, text_encoders
        self._table: dict[tuple[str, str], Target] | None = None  # built on first use (names only)
        self._loaded: dict[str, tuple[LoraFile, float, float, list]] = {}  # name -> (file, unet w, te w, plan)
        self._originals: dict[tuple[str, str], Tensor] = {}  # (part, parameter path) -> untouched CPU copy

    @property
    def weights(self) -> dict[str, tuple[float, float]]:
        """name -> (text-encoder weight, U-Net weight), in merge order (A1111's te:unet order)."""
        return {n: (te, u) for n, (_, u, te, _) in self._loaded.items()}

    def add(self, lora, name: str | None = None, unet_weight: float = 1.0, te_weight: float | None = None,
            strict: bool = True) -> list[str]:
        """Merge `lora` (a path or a LoraFile) under `name` (default: the file's stem); te_weight None = unet_weight.
        Adding a name again replaces it in place (new file or weights). Returns the file's keys that match no
        module, which only strict=False accepts (logged); a file with no usable module at all is an error."""
        f = lora if isinstance(lora, LoraFile) else read_lora(lora)
        name = f.path.stem if name is None else name
        te_weight = unet_weight if te_weight is None else te_weight
        for what, v in (("unet_weight", unet_weight), ("te_weight", te_weight)):
            if not math.isfinite(v):
                raise ValueError(f"{what} must be a finite number, got {v}")
        plan, unmatched = self._plan(f, unet_weight, te_weight, strict)
        replacing = name in self._loaded
        self._loaded[name] = (f, unet_weight, te_weight, plan)
        try:
            if replacing:
                self._rebuild()
            else:
                self._merge(plan)
        except BaseException:  # e.g. out of memory half way: back to the state before this call
            if replacing:
                raise
            del self._loaded[name]
            self._rebuild()
            raise
        return unmatched

    def remove(self, name: str | None = None) -> None:
        """Unmerge one LoRA (the others stay applied) or, with None, all of them."""
        if name is None:
            self._loaded.clear()
        elif name not in self._loaded:
            raise KeyError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self._loaded)}")
        else:
            del self._loaded[name]
        self._rebuild()

    def _plan(self, f: LoraFile, unet_w: float, te_w: float, strict: bool) -> tuple[list, list[str]]:
        """[(target, entry, weight)] for every module of f, checked against the model; and the unmatched keys."""
        if self._table is None:
            self._table = {(part, name): t for part, name, t, _ in table(self.unet, self.text_encoders)}
        plan, unmatched, wrong = [], {k: why for k, why in f.problems.items()}, []
        for (part, name), e in f.entries.items():
            t = self._table.get((part, name))
            if t is None:
                unmatched.update({k: "matches no module" for k in e.keys})
                continue
            w = self._param(t.part, t.weight, dense=False)
            shape = torch.Size([t.rows[1] - t.rows[0], *w.shape[1:]]) if t.rows else w.shape
            try:
                merged(torch.empty(shape, device="meta"), _on_meta(e), 1.0)
                if "diff_b" in e.tensors:
                    b = dict(self._root(part).named_parameters()).get(t.bias)
                    if b is None:
                        raise ValueError(f"diff_b given, but {part}.{t.module} has no bias")
                    fit(e.tensors["diff_b"].to("meta"), torch.Size([shape[0]]))
            except (RuntimeError, ValueError) as err:
                rows = f" rows {t.rows[0]}:{t.rows[1]}" if t.rows else ""
                found = ", ".join(f"{n} {list(v.shape)}" for n, v in e.tensors.items())
                wrong.append(f"{e.keys[0]} -> {part}.{t.weight}{rows} {list(shape)}: {err} (file has {found})")
                continue
            plan.append((t, e, unet_w if part == "unet" else te_w))
        where = f"This LoRA targets {f.describe_target()}; the model is {model_arch(self.unet, self.text_encoders)}."
        listed = "; ".join(f"{k} ({why})" for k, why in list(unmatched.items())[:10])
        errors = [f"{len(wrong)} modules do not fit this model's shapes: " + "; ".join(wrong[:10])
                  + (" ..." if len(wrong) > 10 else "")] if wrong else []
        if unmatched and (strict or not plan):
            errors.append(f"{len(unmatched)} keys match no module of this model"
                          + (" (none fits: nothing would be applied)" if not plan else "") + f": {listed}"
                          + (" ..." if len(unmatched) > 10 else ""))
        if errors:
            hint = " Pass strict=False to apply the rest." if plan and not wrong else ""
            raise CheckpointError(f"{f.path}: " + " | ".join(errors) + f". {where}{hint}")
        if unmatched:
            log.warning("%s: %d LoRA keys not applied (strict=False): %s", f.path, len(unmatched), listed)
        return plan, list(unmatched)

    def _root(self, part: str) -> nn.Module:
        return self.unet if part == "unet" else self.text_encoders[int(part.rsplit(".", 1)[1])]

    def _param(self, part: str, path: str, dense: bool = True) -> Tensor:
        p = self._root(part).get_parameter(path)
        if dense and p.is_mkldnn:  # a packed conv: back to plain weights (bit for bit); repacked on the next call
            speed.unpack_conv_weights(self._root(part))
            p = self._root(part).get_parameter(path)
        return p

    @torch.no_grad()
    def _merge(self, plan: list) -> None:
        for t, e, m in plan:
            if m == 0:  # weight 0: not applied (DoRA's magnitude blend would otherwise still move W)
                continue
            for path, new in ((t.weight, lambda w: merged(w, e, m)),
                              (t.bias, lambda b: b + m * e.tensors["diff_b"].to(b.device, torch.float32))):
                if path == t.bias and "diff_b" not in e.tensors:
                    continue
                p = self._param(t.part, path)
                self._originals.setdefault((t.part, path), p.detach().to("cpu", copy=True))
                view = p[t.rows[0]:t.rows[1]] if t.rows else p  # (W, W) rows of (3W, W), or the whole tensor
                view.copy_(new(view.float()).reshape(view.shape).to(p.dtype))

    @torch.no_grad()
    def _rebuild(self) -> None:
        """Restore every kept original, then merge the loaded LoRAs again in order."""
        for (part, path), orig in self._originals.items():
            self._param(part, path).copy_(orig)
        self._originals.clear()
        for _, _, _, plan in self._loaded.values():
            self._merge(plan)


def _on_meta(e: Entry) -> Entry:
    return Entry(e.kind, {k: v.to("meta") for k, v in e.tensors.items()}, e.keys, e.alpha, e.rank, e.scale,
                 None if e.dora_scale is None else e.dora_scale.to("meta"))
