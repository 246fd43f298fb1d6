"""Frozen dataclass configs and named presets.

A config fully describes a model's topology; the module paths it builds equal the original
(CompVis / Stability) single-file checkpoint keys. YAML files in configs/ only override fields of a preset.
The resolved config is stored as JSON in every checkpoint we write (safetensors metadata key
``latentdiff_config``), so loading our own files never guesses.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting checkpoints (latent 4 + mask 1 + masked-image latent 4)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # transformer blocks per level (0 = no attention at that level); SD1/2: (1,1,1,0), SDXL: (0,2,10)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    # per output block, in output_blocks order (lowest resolution first); () = its level's transformer_depth.
    # Distilled SDXLs thin the up path unevenly: SSD-1B (4,4,10, 2,1,1, 0,0,0)
    transformer_depth_output: tuple[int, ...] = ()
    transformer_depth_middle: int = 1  # 0: the middle block is one ResBlock, no transformer (SSD-1B, Vega)
    middle_block: bool = True  # False: no middle block at all (BK-SDM small / tiny)
    num_heads: int = 8  # used when head_channels == 0 (SD1: 8 heads everywhere)
    head_channels: int = 0  # SD2 / SDXL: 64 channels per head
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD1: 1x1 conv proj_in/out, SD2/SDXL: linear
    adm_in_channels: int = 0  # SDXL: 2816 (pooled 1280 + 6 x 256 Fourier features) into label_emb
    # > 0: LCM-distilled U-Nets take a guidance-scale embedding of this width (diffusers' time_cond_proj_dim;
    # LCM_Dreamshaper_v7: 256) instead of running classifier-free guidance
    time_cond_proj_dim: int = 0
    norm_groups: int = 32

    def output_depths(self) -> tuple[int, ...]:
        """Transformer depth of every output block, in output_blocks order."""
        if self.transformer_depth_output:
            return self.transformer_depth_output
        return tuple(d for d in reversed(self.transformer_depth) for _ in range(self.num_res_blocks + 1))

    def heads_at(self, ch: int) -> tuple[int, int]:
        """(heads, dim_head) for a transformer with ``ch`` channels."""
        if self.head_channels:
            return ch // self.head_channels, self.head_channels
        return self.num_heads, ch // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # latent downsample factor = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SDXL: 0.13025

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    # "clip": transformers CLIPTextModel (OpenAI CLIP-L names); "open_clip": open_clip TextTransformer
    kind: str = "clip"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"  # CLIP-L: quick_gelu; OpenCLIP H / bigG: gelu
    vocab_size: int = 49408
    context_length: int = 77
    pad_id: int = 49407  # CLIP-L pads with the end token; OpenCLIP pads with 0
    # which hidden state conditions the U-Net: 1 = last layer, 2 = penultimate, ...
    layer_from_end: int = 1
    final_norm: bool = True  # pass the chosen hidden state through the final layer norm
    projection_dim: int = 0  # > 0: has text_projection (open_clip towers; SDXL uses it for the pooled vector)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sd15"
    family: str = "sd1"  # sd1 | sd2 | sdxl | sdxl_refiner: decides single-file key prefixes
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: tuple[TextEncoderConfig, ...] = (TextEncoderConfig(),)
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    # noise schedule: betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 ("scaled_linear")
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    # Lin et al. 2023: sqrt(alphas_cumprod) shifted so the last step has SNR 0, i.e. training ends at pure noise
    # as sampling starts (needs v_prediction); diffusers' rescale_betas_zero_snr
    zero_terminal_snr: bool = False
    # recommended generation defaults
    size: int = 512
    sampler: str = "euler"
    # None: each sampler's diffusers default with the released SD scheduler config; SDXL's config says "leading"
    timestep_spacing: str | None = None
    steps: int = 30
    guidance_scale: float = 7.5

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        d = dict(d)
        d["unet"] = _build(UNetConfig, d.get("unet", {}))
        d["vae"] = _build(VAEConfig, d.get("vae", {}))
        d["text"] = tuple(_build(TextEncoderConfig, t) for t in d.get("text", []))
        return _build(ModelConfig, d)

    @staticmethod
    def from_json(s: str) -> "ModelConfig":
        return ModelConfig.from_dict(json.loads(s))


def _build(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; allowed: {sorted(names)}")
    # JSON / YAML give lists; our configs hold tuples so they stay hashable and frozen
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- presets -----------------------------------------------------------------------------------------------

CLIP_L = TextEncoderConfig()
OPENCLIP_H = TextEncoderConfig(kind="open_clip", width=1024, layers=24, heads=16, act="gelu", pad_id=0,
                               layer_from_end=2, final_norm=True, projection_dim=1024)  # projection unused by SD2
# SDXL: CLIP-L penultimate without final norm, bigG penultimate without final norm (+ pooled projection)
SDXL_CLIP_L = replace(CLIP_L, layer_from_end=2, final_norm=False)
OPENCLIP_BIGG = TextEncoderConfig(kind="open_clip", width=1280, layers=32, heads=20, act="gelu", pad_id=0,
                                  layer_from_end=2, final_norm=False, projection_dim=1280)

SD15 = ModelConfig()
SD21 = ModelConfig(
    name="sd21", family="sd2",
    unet=UNetConfig(head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    text=(OPENCLIP_H,),
)
SD21_V = replace(SD21, name="sd21_v", prediction_type="v_prediction", size=768)
SDXL = ModelConfig(
    name="sdxl", family="sdxl",
    unet=UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                    head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816),
    vae=VAEConfig(scaling_factor=0.13025),
    text=(SDXL_CLIP_L, OPENCLIP_BIGG),
    size=1024, timestep_spacing="leading",
)
# The SDXL refiner (sgm sd_xl_refiner.yaml): bigG alone (penultimate, no final norm, pooled projection), a wider
# U-Net with attention at levels 1-2 only, and 5 numbers in label_emb: original size, crop, aesthetic score
# (adm 2560 = pooled 1280 + 5 x 256)
SDXL_REFINER = replace(
    SDXL, name="sdxl_refiner", family="sdxl_refiner",
    unet=UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                    transformer_depth_middle=4, head_channels=64, context_dim=1280, use_linear_in_transformer=True,
                    adm_in_channels=2560),
    text=(OPENCLIP_BIGG,),
)

# Tiny twins: same topology and key names, small widths; a forward pass takes milliseconds on CPU.
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
_TINY_CLIP = replace(CLIP_L, width=32, layers=2, heads=4)
TINY_SD15 = replace(
    SD15, name="tiny-sd15",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                    num_heads=2, context_dim=32),
    vae=_TINY_VAE, text=(_TINY_CLIP,), size=64, steps=10,
)
TINY_SD21 = replace(
    SD21, name="tiny-sd21",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                    head_channels=8, context_dim=64, use_linear_in_transformer=True),
    vae=_TINY_VAE,
    text=(replace(OPENCLIP_H, width=64, layers=3, heads=4, projection_dim=64),),
    size=64, steps=10,
)
TINY_SD21_V = replace(TINY_SD21, name="tiny-sd21_v", prediction_type="v_prediction")
TINY_SDXL = replace(
    SDXL, name="tiny-sdxl",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 2),
                    transformer_depth_middle=2, head_channels=8, context_dim=96,
                    use_linear_in_transformer=True, adm_in_channels=64 + 6 * 32),
    vae=replace(_TINY_VAE, scaling_factor=0.13025),
    text=(replace(SDXL_CLIP_L, width=32, layers=2, heads=4),
          replace(OPENCLIP_BIGG, width=64, layers=3, heads=4, projection_dim=64)),
    size=64, steps=10,
)
TINY_SDXL_REFINER = replace(
    TINY_SDXL, name="tiny-sdxl-refiner", family="sdxl_refiner",
    unet=replace(TINY_SDXL.unet, context_dim=64, adm_in_channels=64 + 5 * 32),
    text=TINY_SDXL.text[1:],
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SD15, SD21, SD21_V, SDXL, SDXL_REFINER, TINY_SD15, TINY_SD21, TINY_SD21_V, TINY_SDXL,
                        TINY_SDXL_REFINER)
}


def with_inpainting(cfg: ModelConfig) -> ModelConfig:
    """The 9-input-channel inpainting twin of a config (SD 1.x / 2.x inpainting checkpoints)."""
    return replace(cfg, name=cfg.name + "-inpaint", unet=replace(cfg.unet, in_channels=9))


def with_guidance_embedding(cfg: ModelConfig, dim: int) -> ModelConfig:
    """An LCM-distilled twin of `cfg`: its U-Net embeds the guidance scale (width `dim`), and the generation
    defaults are diffusers' LatentConsistencyModelPipeline's (lcm, 4 steps, guidance 8.5)."""
    return replace(cfg, name=f"{cfg.name}-lcm", unet=replace(cfg.unet, time_cond_proj_dim=dim), sampler="lcm",
                   steps=4, guidance_scale=8.5)


def get_preset(name: str) -> ModelConfig:
    if name.endswith("-inpaint") and name[: -len("-inpaint")] in PRESETS:
        return with_inpainting(PRESETS[name[: -len("-inpaint")]])
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)} (each also as '<name>-inpaint')")
    return PRESETS[name]


def override(cfg: ModelConfig, changes: dict) -> ModelConfig:
    """Apply nested overrides, e.g. {"unet": {"model_channels": 64}, "prediction_type": "v_prediction"}."""
    d = dataclasses.asdict(cfg)
    for k, v in changes.items():
        if k in ("unet", "vae") and isinstance(v, dict):
            d[k].update(v)
        elif k == "text" and isinstance(v, list) and v and isinstance(v[0], dict):
            d[k] = [dict(d[k][i], **t) if i < len(d[k]) else t for i, t in enumerate(v)]
        else:
            d[k] = v
    return ModelConfig.from_dict(d)


def load_config(name_or_path: str) -> ModelConfig:
    """A preset name, or a YAML file ``{preset: sd15, unet: {...}, ...}`` of overrides."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        if not p.is_file():
            raise FileNotFoundError(f"model config {p} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if "preset" not in d:
            raise ValueError(f"{p}: needs a 'preset' field naming the base config; allowed: {sorted(PRESETS)}")
        return override(get_preset(d.pop("preset")), d)
    return get_preset(name_or_path)
