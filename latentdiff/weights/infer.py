"""Model configs from the weights alone: every size a single file's tensors hold, for the U-Net, the VAE and the
text encoders (used by `layout.detect` once the family is known from the text-encoder keys).

What shapes cannot say comes from the family's preset (SD 1.x: `sd15`, 2.x: `sd21`, XL: `sdxl`, `sdxl_refiner`): norm groups,
activations, which hidden state conditions the U-Net, pad ids, the VAE scaling factor, generation defaults. Head
counts are not in the weights either; the published rule (ComfyUI's `supported_models`, diffusers' SD configs):
a U-Net with a 768-wide context and 1x1-conv projections (SD 1.x and its distillations, BK-SDM) has 8 heads
everywhere, any other 64-channel heads; a text encoder has width / 64 heads (OpenAI CLIP's `build_model`).

The inferred config is then compared with every preset of the family on what the weights determine: a preset
with the same shapes is returned itself (its name, heads and defaults), so a released SD 1.5 is exactly `sd15`
and the tiny presets, whose heads break the rule, round-trip too. Anything else gets the rule, is checked for
consistency (heads divide every width, context width = text width(s), SDXL's added-embedding width) and is named
after the file. A shape this cannot express raises CheckpointError; `check_keys` then compares every tensor with
the built model, so a config that does not reproduce the file exactly is never loaded.

U-Net walk (ComfyUI's `detect_unet_config`, shared/reference/wave2-formats.md section 7): `input_blocks.N.0.op`
closes a level; a ResBlock `input_blocks.N.0` counts towards num_res_blocks and gives channel_mult from its
`out_layers.3` width; `N.1.transformer_blocks.k` count the depth; output blocks are read one by one; the middle
block has a transformer, is one ResBlock only, or is absent.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import PRESETS, SD15, SD21, SDXL, SDXL_REFINER, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, with_guidance_embedding, with_inpainting
from .io import CheckpointError

UNET_PREFIX = "model.diffusion_model."  # = layout.UNET_PREFIX (layout imports this module)
FAMILY_BASE = {"sd1": SD15, "sd2": SD21, "sdxl": SDXL, "sdxl_refiner": SDXL_REFINER}
SIZE_NUMBERS = {"sdxl": 6, "sdxl_refiner": 5}  # label_emb's Fourier-embedded numbers (see models/unet.sdxl_vector)
HEAD_CHANNELS = 64


class _Shapes:
    """Shapes of a file with every dotted key prefix indexed, so block counts are set lookups."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], path):
        self.shapes, self.path = shapes, path
        self.prefixes = {k[: i + 1] for k in shapes for i, c in enumerate(k) if c == "."}

    def __getitem__(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise CheckpointError(f"{self.path}: cannot infer the architecture: {key} is missing")
        return self.shapes[key]

    def has(self, key_or_prefix: str) -> bool:
        return key_or_prefix in self.shapes or key_or_prefix in self.prefixes

    def count(self, prefix: str) -> int:
        """How many of prefix.0., prefix.1., ... exist, in a row."""
        n = 0
        while f"{prefix}{n}." in self.prefixes:
            n += 1
        return n

    def fail(self, why: str):
        raise CheckpointError(f"{self.path}: cannot infer the architecture: {why}; pass config= (a preset name, a "
                              "YAML file or a ModelConfig) if this model is supported otherwise")


# --- U-Net ------------------------------------------------------------------------------------------------


def heads_rule(context_dim: int, linear: bool) -> dict:
    """Head fields of UNetConfig by the published rule (heads are not in the weights)."""
    if context_dim == 768 and not linear:
        return dict(num_heads=8, head_channels=0)  # SD 1.x: 8 heads at every width
    return dict(num_heads=8, head_channels=HEAD_CHANNELS)  # SD 2.x, SDXL and the rest: 64 channels per head


def unet_config(s: _Shapes, base: UNetConfig, context_fallback: int, encoder_only: bool = False) -> UNetConfig:
    """encoder_only: the weights hold no decoder (a ControlNet's copy of the encoder); its fields keep the
    defaults of the mirrored encoder."""
    p = UNET_PREFIX
    mc, in_ch = s[p + "input_blocks.0.0.weight"][:2]
    out_ch = base.out_channels if encoder_only else s[p + "out.2.weight"][0]
    adm = s[p + "label_emb.0.0.weight"][1] if s.has(p + "label_emb.0.0.weight") else 0
    cond_proj = s[p + "time_embedding.cond_proj.weight"][1] if s.has(p + "time_embedding.cond_proj.weight") else 0
    transformers: list[str] = []  # prefixes of every SpatialTransformer with blocks

    def depth(prefix: str) -> int:  # transformer blocks of the SpatialTransformer at prefix (0: none there)
        if not s.has(prefix + "proj_in.weight"):
            return 0
        transformers.append(prefix)
        return s.count(prefix + "transformer_blocks.")

    levels: list[list[int]] = [[]]  # per level, the depth after each of its ResBlocks
    mults: list[int | None] = [None]
    for n in range(1, s.count(p + "input_blocks.")):
        b = f"{p}input_blocks.{n}."
        if s.has(b + "0.op.weight"):
            levels.append([])
            mults.append(None)
        elif s.has(b + "0.in_layers.0.weight"):
            width = s[b + "0.out_layers.3.weight"][0]
            if width % mc or mults[-1] not in (None, width // mc):
                s.fail(f"input_blocks.{n} is {width} wide, not a multiple of model_channels {mc} equal to its "
                       "level's")
            mults[-1] = width // mc
            levels[-1].append(depth(b + "1."))
        else:
            s.fail(f"input_blocks.{n} is neither a ResBlock nor a Downsample")
    res = {len(lv) for lv in levels}
    if len(res) != 1 or 0 in res:
        s.fail(f"ResBlocks per level differ ({[len(lv) for lv in levels]}); one count for every level is supported")
    r = res.pop()
    if any(len(set(lv)) != 1 for lv in levels):
        s.fail(f"transformer depths differ within a down level ({levels}); only the up path may vary per block")
    level_depth = tuple(lv[0] for lv in levels)
    n_out = s.count(p + "output_blocks.")
    if n_out != len(levels) * (r + 1) and not encoder_only:
        s.fail(f"{n_out} output blocks for {len(levels)} levels of {r} ResBlocks (expected {len(levels) * (r + 1)})")
    out_depth = tuple(depth(f"{p}output_blocks.{n}.1.") for n in range(n_out))
    middle = s.has(p + "middle_block.0.in_layers.0.weight")
    mid_depth = depth(p + "middle_block.1.") if middle else 0

    contexts = {s[t + "transformer_blocks.0.attn2.to_k.weight"][1] for t in transformers
                if s.has(t + "transformer_blocks.0.")}
    linear = {len(s[t + "proj_in.weight"]) == 2 for t in transformers}
    if len(contexts) > 1 or len(linear) > 1:
        s.fail(f"transformers differ in context width {sorted(contexts)} or projection kind (linear: {linear})")
    context = contexts.pop() if contexts else context_fallback
    linear = linear.pop() if linear else base.use_linear_in_transformer
    cfg = UNetConfig(
        in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=tuple(mults), num_res_blocks=r,
        transformer_depth=level_depth, transformer_depth_middle=mid_depth, middle_block=middle,
        context_dim=context, use_linear_in_transformer=linear, adm_in_channels=adm, time_cond_proj_dim=cond_proj,
        norm_groups=base.norm_groups,
        **heads_rule(context, linear))
    if out_depth != cfg.output_depths() and not encoder_only:
        cfg = replace(cfg, transformer_depth_output=out_depth)
    return cfg


def _check_heads(s: _Shapes, cfg: UNetConfig) -> None:
    widths = {cfg.model_channels * m for m, d in zip(cfg.channel_mult, cfg.transformer_depth) if d}
    widths |= {cfg.model_channels * m for m, d in zip(reversed(cfg.channel_mult), _per_up_level(cfg)) if d}
    if cfg.middle_block and cfg.transformer_depth_middle:
        widths.add(cfg.model_channels * cfg.channel_mult[-1])
    per = cfg.head_channels or None
    bad = sorted(w for w in widths if w % (per or cfg.num_heads))
    if bad:
        rule = f"{per}-channel heads" if per else f"{cfg.num_heads} heads"
        s.fail(f"attention widths {bad} do not split into {rule} (the head count is not in the weights; the rule: "
               "768-wide context with conv projections -> 8 heads, else 64-channel heads)")


def _per_up_level(cfg: UNetConfig) -> list[int]:
    d, r = cfg.output_depths(), cfg.num_res_blocks + 1
    return [max(d[k * r:(k + 1) * r]) for k in range(len(cfg.channel_mult))]


# --- VAE and text encoders ------------------------------------------------------------------------------------


def vae_config(s: _Shapes, prefix: str, base: VAEConfig) -> VAEConfig:
    e = prefix + "encoder."
    ch, in_ch = s[e + "conv_in.weight"][:2]
    mults, res = [], set()
    for i in range(s.count(e + "down.")):
        width = s[f"{e}down.{i}.block.0.conv1.weight"][0]
        if width % ch:
            s.fail(f"VAE level {i} is {width} wide, not a multiple of its base width {ch}")
        mults.append(width // ch)
        res.add(s.count(f"{e}down.{i}.block."))
    if len(res) != 1:
        s.fail(f"VAE ResBlocks per level differ ({sorted(res)})")
    return replace(base, in_channels=in_ch, out_channels=s[prefix + "decoder.conv_out.weight"][0], ch=ch,
                   ch_mult=tuple(mults), num_res_blocks=res.pop(), z_channels=s[prefix + "decoder.conv_in.weight"][1])


def text_config(s: _Shapes, prefix: str, base: TextEncoderConfig) -> TextEncoderConfig:
    """A CLIP (transformers names under `transformer.text_model.`) or OpenCLIP (`model.`) text tower."""
    if base.kind == "clip":
        t = prefix + "transformer.text_model."
        vocab, width = s[t + "embeddings.token_embedding.weight"]
        length = s[t + "embeddings.position_embedding.weight"][0]
        layers = s.count(t + "encoder.layers.")
        ff = s[t + "encoder.layers.0.mlp.fc1.weight"][0]
        proj = 0
    else:
        t = prefix + "model."
        vocab, width = s[t + "token_embedding.weight"]
        length = s[t + "positional_embedding"][0]
        layers = s.count(t + "transformer.resblocks.")
        ff = s[t + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        proj = s[t + "text_projection"][1] if s.has(t + "text_projection") else 0
    return replace(base, width=width, layers=layers, heads=width // HEAD_CHANNELS, mlp_ratio=ff / width,
                   vocab_size=vocab, context_length=length, projection_dim=proj)


# --- the whole model --------------------------------------------------------------------------------------------


def _weights_view(cfg: ModelConfig, vae: bool = True) -> tuple:
    """The fields the weights determine (in_channels aside: inpainting twins share a preset)."""
    return (cfg.family,
            replace(cfg.unet, num_heads=0, head_channels=0, norm_groups=0, in_channels=0, time_cond_proj_dim=0),
            replace(cfg.vae, norm_groups=0, scaling_factor=0.0) if vae else None,
            tuple(replace(t, heads=0) for t in cfg.text))


def match_preset(cfg: ModelConfig, vae: bool = True) -> ModelConfig | None:
    """The preset with the shapes of `cfg` (compared without the VAE if not `vae`), as its 9-channel inpainting
    twin or with another input width where `cfg` has one, as its LCM-distilled twin where `cfg` has a guidance
    embedding; None if no preset has them."""
    view = _weights_view(cfg, vae)
    for preset in PRESETS.values():
        if _weights_view(preset, vae) == view:
            if cfg.unet.time_cond_proj_dim:
                return with_guidance_embedding(match_preset(replace(cfg, unet=replace(
                    cfg.unet, time_cond_proj_dim=0)), vae), cfg.unet.time_cond_proj_dim)
            n = cfg.unet.in_channels
            if n == preset.unet.in_channels:
                return preset
            if n == 9:
                return with_inpainting(preset)
            return replace(preset, name=f"{preset.name}-in{n}", unet=replace(preset.unet, in_channels=n))
    return None


def model_config(shapes: dict[str, tuple[int, ...]], family: str, text_prefixes: tuple[str, ...],
                 vae_prefix: str, path="checkpoint", presets: bool = True) -> tuple[ModelConfig, bool]:
    """Every size from the weights, the rest from the family preset; with `presets`, a preset when one has these
    shapes. A file without VAE weights gets the matching preset's VAE, else the family's (a standalone VAE file
    is loaded into it). -> (config, whether it is a preset's)."""
    s = _Shapes(shapes, path)
    base = FAMILY_BASE[family]
    texts = tuple(text_config(s, p, t) for p, t in zip(text_prefixes, base.text))
    has_vae = s.has(vae_prefix + "decoder.")
    vae = vae_config(s, vae_prefix, base.vae) if has_vae else base.vae
    unet = unet_config(s, base.unet, sum(t.width for t in texts))
    cfg = replace(base, name=Path(str(path)).stem, unet=unet, vae=vae, text=texts)
    preset = match_preset(cfg, vae=has_vae) if presets else None
    if preset is not None:
        return preset, True
    cfg = _custom(s, cfg)
    return (with_guidance_embedding(cfg, unet.time_cond_proj_dim) if unet.time_cond_proj_dim else cfg), False


def _custom(s: _Shapes, cfg: ModelConfig) -> ModelConfig:
    """A config no preset has: check what the rule and the parts must agree on."""
    u = cfg.unet
    _check_heads(s, u)
    bad = [t.width for t in cfg.text if t.width % HEAD_CHANNELS]
    if bad:
        s.fail(f"text encoder width(s) {bad} are not multiples of {HEAD_CHANNELS} (heads = width / 64 is the rule)")
    context = sum(t.width for t in cfg.text)
    if u.context_dim != context:
        s.fail(f"the U-Net attends to a {u.context_dim}-wide context but the text encoder(s) give {context}")
    if cfg.family in SIZE_NUMBERS:
        n, fourier = SIZE_NUMBERS[cfg.family], u.adm_in_channels - cfg.text[-1].projection_dim
        if fourier <= 0 or fourier % n:
            s.fail(f"label_emb takes {u.adm_in_channels} inputs: the pooled text ({cfg.text[-1].projection_dim}) "
                   f"plus {n} numbers of equal Fourier width do not add up to it")
    return cfg
