"""Configs from the weights (issue #26): presets round-trip through inference, non-preset stand-ins load with no
config and compute like diffusers, file variants load to the same tensors, metadata and marker tensors decide
eps / v, and files that are not models are named with what to do."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from latentdiff import weights
from latentdiff.config import (CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, PRESETS, SD15, SD21, SDXL, SDXL_CLIP_L, ModelConfig,
                               VAEConfig, with_inpainting)
from latentdiff.weights import infer, layout
from latentdiff.weights.diffusers.unet import from_diffusers
from latentdiff.weights.folder import unet_config_from
from latentdiff.weights.single_file import read_single_file
from conftest import layout as released_layout
from conftest import tiny_pipe, unet_inputs

UNET = layout.UNET_PREFIX


# --- presets round-trip --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip(name):
    cfg = PRESETS[name]
    same_shapes = PRESETS[name.removesuffix("_v")]  # sd21_v has sd21's shapes: eps / v is decided later
    assert weights.detect(weights.expected_shapes(cfg)) == same_shapes
    assert weights.detect(weights.expected_shapes(with_inpainting(cfg))) == with_inpainting(same_shapes)


@pytest.mark.parametrize("base", [SD15, SD21, SDXL], ids=lambda c: c.name)
def test_the_rule_alone_gives_the_full_size_presets(base):
    # without the preset match, the weights plus the head rule give the same config (names aside)
    shapes = weights.expected_shapes(base)
    cfg, preset = infer.model_config(shapes, base.family, layout.TEXT_PREFIXES[base.family], layout.VAE_PREFIX,
                                     "x.safetensors", presets=False)
    assert not preset and replace(cfg, name=base.name) == base


@pytest.mark.parametrize("name, base", [("sd15", SD15), ("sd21", SD21), ("sdxl", SDXL)])
def test_released_layouts_are_their_presets(name, base):
    names = layout.file_names({k: tuple(v[0]) for k, v in released_layout(name).items()})
    assert weights.detect({k: tuple(released_layout(name)[v][0]) for k, v in names.items()}) == base


def test_head_rule():
    assert infer.heads_rule(768, linear=False) == dict(num_heads=8, head_channels=0)  # SD 1.x, BK-SDM
    for context, linear in ((768, True), (1024, True), (2048, True), (64, False)):
        assert infer.heads_rule(context, linear)["head_channels"] == 64


# --- stand-ins with non-preset widths, built by diffusers -------------------------------------------------------


def _dcfg(**kw) -> dict:
    return {**dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                   flip_sin_to_cos=True, freq_shift=0), **kw}


_XL = dict(block_out_channels=[64, 128, 192], layers_per_block=1, use_linear_projection=True,
           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
           transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 3], cross_attention_dim=64 + 128,
           addition_embed_type="text_time", addition_time_embed_dim=16, projection_class_embeddings_input_dim=160)
_SD1 = dict(block_out_channels=[64, 128, 128], layers_per_block=1, cross_attention_dim=64, attention_head_dim=[1, 2, 2],
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
_TEXT = {  # widths multiples of 64: text-encoder heads are width / 64 by the rule
    "sd1": (replace(CLIP_L, width=64, layers=1, heads=1),),
    "sd2": (replace(OPENCLIP_H, width=128, layers=2, heads=2, projection_dim=128),),
    "sdxl": (replace(SDXL_CLIP_L, width=64, layers=2, heads=1),
             replace(OPENCLIP_BIGG, width=128, layers=2, heads=2, projection_dim=64)),
}
STANDINS = {
    "sd1": ("sd1", _dcfg(**_SD1), _TEXT["sd1"]),
    "sd1-instruct-8ch": ("sd1", _dcfg(**dict(_SD1, in_channels=8)), _TEXT["sd1"]),
    "sd2": ("sd2", _dcfg(block_out_channels=[64, 128], layers_per_block=2, use_linear_projection=True,
                         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=128,
                         attention_head_dim=[1, 2]), _TEXT["sd2"]),
    "sdxl": ("sdxl", _dcfg(**_XL), _TEXT["sdxl"]),
    "sdxl-inpaint-9ch": ("sdxl", _dcfg(**dict(_XL, in_channels=9)), _TEXT["sdxl"]),
    # SSD-1B's structure: 2 ResBlocks per level, uneven up-path depths (4,4,10 / 2,1,1 there), a middle block of
    # one ResBlock (ComfyUI's transformer_depth_middle -1)
    "ssd-1b": ("sdxl", _dcfg(**dict(_XL, layers_per_block=2, transformer_layers_per_block=[1, 2, 3],
                                    reverse_transformer_layers_per_block=[[3, 3, 4], [2, 1, 1], [1, 1, 1]],
                                    mid_block_type="UNetMidBlock2D")), _TEXT["sdxl"]),
    # the SDXL refiner's: bigG alone, attention at the middle levels only, 5 numbers (aesthetic score) in label_emb
    "sdxl-refiner": ("sdxl_refiner", _dcfg(
        block_out_channels=[64, 128, 128, 128], layers_per_block=1, use_linear_projection=True,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=2, attention_head_dim=[1, 2, 2, 2], cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=16, projection_class_embeddings_input_dim=64 + 80),
        (replace(OPENCLIP_BIGG, width=64, layers=2, heads=1, projection_dim=64),)),
    # BK-SDM-tiny's: SD 1.x without the innermost level and without a middle block, one ResBlock per level; a
    # 768-wide context with conv projections, so the rule's 8 heads (CLIP-L width, a small vocabulary)
    "bk-sdm-tiny": ("sd1", _dcfg(block_out_channels=[64, 128, 128], layers_per_block=1, cross_attention_dim=768,
                                 attention_head_dim=8, mid_block_type=None, down_block_types=["CrossAttnDownBlock2D"] * 3,
                                 up_block_types=["CrossAttnUpBlock2D"] * 3),
                    (replace(CLIP_L, width=768, layers=1, vocab_size=1000),)),
}


def _randomised(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    # every parameter re-drawn (diffusers zero-initialises output convs); norm scales near 1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if p.ndim == 1 and name.endswith("weight") else 0.0) + std * torch.randn(p.shape, generator=g))
    return model.eval()


def _standin_file(path: Path, family: str, dcfg: dict, texts) -> tuple[ModelConfig, torch.nn.Module]:
    """A single file (original layout, no metadata) whose U-Net is a random diffusers model; -> (the config a
    reader should arrive at, the diffusers model)."""
    from diffusers import UNet2DConditionModel

    theirs = _randomised(UNet2DConditionModel(**dcfg), seed=1)
    base = infer.FAMILY_BASE[family]
    cfg = replace(base, name=path.stem, unet=unet_config_from(dcfg), text=texts,
                  vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=base.vae.scaling_factor))
    torch.manual_seed(0)
    modules = weights.build_modules(cfg, meta=False)
    sd = {k: v for k, v in weights.state_dict_of(cfg, modules).items() if not k.startswith(UNET)}
    sd.update({UNET + k: v.contiguous() for k, v in from_diffusers(theirs.state_dict(), cfg.unet).items()})
    save_file(sd, path)
    return cfg, theirs


@pytest.mark.parametrize("name", list(STANDINS))
def test_standin_loads_without_config_and_matches_diffusers(tmp_path, name):
    family, dcfg, texts = STANDINS[name]
    expected, theirs = _standin_file(tmp_path / f"{name}.safetensors", family, dcfg, texts)
    cfg, modules = read_single_file(tmp_path / f"{name}.safetensors", dtype=torch.float32)
    assert cfg == expected  # every field: sizes from the weights, heads by the rule, the rest from the family

    pooled_dim = texts[-1].projection_dim if cfg.unet.adm_in_channels else 0
    (x, t, context, y), kwargs = unet_inputs(cfg.unet, pooled_dim, refiner=family == "sdxl_refiner")
    with torch.no_grad():
        a = modules["unet"].eval()(x, t, context, y)
        b = theirs(x, t, encoder_hidden_states=context, **kwargs).sample
    assert b.abs().max() > 1.0
    assert (a - b).abs().max().item() <= 1e-4


def test_standin_structures_are_what_they_claim():
    bk = unet_config_from(STANDINS["bk-sdm-tiny"][1])
    assert not bk.middle_block and bk.num_heads == 8 and not bk.head_channels
    ssd = unet_config_from(STANDINS["ssd-1b"][1])
    assert ssd.middle_block and ssd.transformer_depth_middle == 0 and ssd.transformer_depth == (0, 2, 3)
    assert ssd.transformer_depth_output == (3, 3, 4, 2, 1, 1, 0, 0, 0)
    # the SSD-1B and Vega published depths (ComfyUI's supported_models) are expressible
    for out in ((4, 4, 10, 2, 1, 1, 0, 0, 0), (2, 2, 2, 1, 1, 1, 0, 0, 0)):
        cfg = replace(SDXL.unet, transformer_depth_output=out, transformer_depth_middle=0)
        assert weights.detect(weights.expected_shapes(replace(SDXL, unet=cfg))).unet == cfg


def test_config_of_a_custom_model_is_saved_and_read_back(tmp_path):
    cfg = replace(SDXL, name="ssd-like", unet=unet_config_from(STANDINS["ssd-1b"][1]), text=_TEXT["sdxl"],
                  vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scaling_factor=0.13025))
    pipe = latentdiff.from_config(cfg)
    pipe.save(tmp_path / "m.safetensors")
    meta = weights.SafetensorsFile(tmp_path / "m.safetensors").metadata[weights.CONFIG_KEY]
    assert '"transformer_depth_output": [3, 3, 4, 2, 1, 1, 0, 0, 0]' in meta
    assert read_single_file(tmp_path / "m.safetensors")[0] == cfg
    # configs written before these fields existed still load, with the old topology
    shipped = Path(__file__).parent.parent / "checkpoints" / "emoji.safetensors"
    old = ModelConfig.from_json(weights.SafetensorsFile(shipped).metadata[weights.CONFIG_KEY])
    assert old.unet.middle_block and old.unet.transformer_depth_output == ()


# --- variants of one file -----------------------------------------------------------------------------------------


def _plain(tmp_path) -> dict[str, torch.Tensor]:
    pipe = tiny_pipe("tiny-sd15")
    sd = {k: v.detach().clone() for k, v in weights.state_dict_of(pipe.cfg, {
        "unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders}).items()}
    save_file(sd, tmp_path / "plain.safetensors")
    return sd


def _loaded(path, **kw) -> dict[str, torch.Tensor]:
    cfg, modules = read_single_file(path, **kw)
    assert cfg == PRESETS["tiny-sd15"]  # detected, no config given
    return weights.state_dict_of(cfg, modules)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ckpt_nested_under_state_dict(tmp_path):
    sd = _plain(tmp_path)
    torch.save({"state_dict": sd, "global_step": 3, "epoch": 1}, tmp_path / "m.ckpt")
    assert _same(_loaded(tmp_path / "m.ckpt", dtype=torch.float32), sd)


def test_ema_copy_is_used_only_when_asked(tmp_path, caplog):
    sd = _plain(tmp_path)
    ema = {layout.EMA_PREFIX + k[len("model."):].replace(".", ""): v * 0.5 for k, v in sd.items()
           if k.startswith(UNET)}
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema  # CompVis LitEma's naming
    save_file({**sd, **ema, "model_ema.decay": torch.tensor(0.9999),
               "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}, tmp_path / "ema.safetensors")
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        assert _same(_loaded(tmp_path / "ema.safetensors", dtype=torch.float32), sd)
    assert "ema=True" in caplog.text
    with_ema = _loaded(tmp_path / "ema.safetensors", dtype=torch.float32, ema=True)
    assert _same(with_ema, {k: v * 0.5 if k.startswith(UNET) else v for k, v in sd.items()})
    with pytest.raises(weights.CheckpointError, match="ema=True"):
        read_single_file(tmp_path / "plain.safetensors", ema=True)
    pipe = latentdiff.load(tmp_path / "ema.safetensors", dtype=torch.float32, ema=True)  # the public API
    assert torch.equal(pipe.unet.input_blocks[0][0].weight, sd[UNET + "input_blocks.0.0.weight"] * 0.5)


@pytest.mark.parametrize("position_ids", [True, False])
def test_old_transformers_clip_keys(tmp_path, position_ids):
    sd = _plain(tmp_path)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sd.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    if position_ids:
        old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[None]  # some are floats
    save_file(old, tmp_path / "old.safetensors")
    assert _same(_loaded(tmp_path / "old.safetensors", dtype=torch.float32), sd)


def test_training_leftovers_are_ignored_with_one_line(tmp_path, caplog):
    sd = _plain(tmp_path)
    extra = {"loss.discriminator.main.0.weight": torch.zeros(2, 3), "loss.logvar": torch.zeros(()),
             "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}
    save_file({**sd, **extra}, tmp_path / "extra.safetensors")
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        assert _same(_loaded(tmp_path / "extra.safetensors", dtype=torch.float32), sd)
    lines = [r.getMessage() for r in caplog.records if "not model weights" in r.getMessage()]
    assert len(lines) == 1 and "4 keys" in lines[0]


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=str)
def test_low_precision_storage_is_upcast(tmp_path, stored):
    sd = _plain(tmp_path)
    low = {k: v.to(stored) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(low, tmp_path / "low.safetensors")
    assert weights.SafetensorsFile(tmp_path / "low.safetensors").entries[UNET + "out.2.weight"][0] == stored
    rounded = {k: v.float() for k, v in low.items()}  # exactly the rounding the storage implies
    assert _same(_loaded(tmp_path / "low.safetensors", dtype=torch.float32), rounded)
    if stored in (torch.float8_e4m3fn, torch.float8_e5m2):  # no compute dtype given: float8 still becomes float32
        assert _same(_loaded(tmp_path / "low.safetensors"), rounded)


# --- metadata and marker tensors ---------------------------------------------------------------------------------


CASES = [
    ({}, (), "epsilon", False, "the default"),
    ({"modelspec.prediction_type": "v"}, (), "v_prediction", False, "modelspec.prediction_type"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, (), "v_prediction", False, "ModelSpec architecture"),
    ({"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}, (), "v_prediction", True, "ss_v_param"),
    ({}, ("v_pred", "ztsnr"), "v_prediction", True, "v_pred marker"),
    ({"modelspec.prediction_type": "epsilon"}, ("v_pred",), "epsilon", False, "modelspec.prediction_type"),
]


@pytest.mark.parametrize("metadata, markers, pt, zsnr, why", CASES)
def test_metadata_and_markers_decide_prediction(tmp_path, caplog, metadata, markers, pt, zsnr, why):
    pipe = tiny_pipe("tiny-sd21")
    sd = weights.state_dict_of(pipe.cfg, {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders})
    sd.update({m: torch.zeros(0) for m in markers})
    save_file(sd, tmp_path / "m.safetensors", metadata=metadata)
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        cfg, _ = read_single_file(tmp_path / "m.safetensors")
    assert (cfg.prediction_type, cfg.zero_terminal_snr) == (pt, zsnr)
    assert why in caplog.text
    cfg, _ = read_single_file(tmp_path / "m.safetensors", prediction_type="epsilon")  # the argument comes first
    assert cfg.prediction_type == "epsilon"


def test_modelspec_resolution_and_family_disagreement(tmp_path, caplog):
    sd = _plain(tmp_path)
    save_file(sd, tmp_path / "m.safetensors", metadata={"modelspec.resolution": "768x768",
                                                         "modelspec.architecture": "stable-diffusion-xl-v1-base"})
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        cfg, _ = read_single_file(tmp_path / "m.safetensors")
    assert cfg.size == 768 and cfg.family == "sd1"
    assert any(r.levelno == logging.WARNING and "going by the weights" in r.getMessage() for r in caplog.records)


# --- what is not a model, and what cannot be inferred ---------------------------------------------------------------


NOT_MODELS = {
    "kohya LoRA": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 320),
                    "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": (320, 4),
                    "lora_unet_input_blocks_1_1_proj_in.alpha": (), "lora_te1_text_model_x.lora_down.weight": (4, 8)},
                   r"a LoRA.*pipe\.load_lora\(path\)"),
    "PEFT LoRA": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320),
                   "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": (320, 4)}, "a LoRA"),
    "VAE, prefixed": ({"first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
                       "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, r"standalone VAE.*vae=path"),
    "VAE, bare": ({"decoder.conv_out.weight": (3, 128, 3, 3), "encoder.conv_in.weight": (128, 3, 3, 3),
                   "loss.logvar": ()}, "standalone VAE"),
    "text encoder": ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
                      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
                     "only a text encoder"),
    "embedding": ({"clip_l": (2, 768), "clip_g": (2, 1280)}, r"embedding.*pipe\.load_embedding"),
    "U-Net alone": ({UNET + "input_blocks.0.0.weight": (320, 4, 3, 3)}, "U-Net .* without a known text encoder"),
    "unknown": ({"model.foo.weight": (3,)}, r"unknown checkpoint layout.*model\.foo"),
}


@pytest.mark.parametrize("name", list(NOT_MODELS))
def test_files_that_are_not_models_say_what_they_are(name):
    shapes, message = NOT_MODELS[name]
    with pytest.raises(weights.CheckpointError, match=message):
        weights.detect(shapes, "x.safetensors")


def test_not_a_model_error_names_the_file(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "style.safetensors")
    with pytest.raises(weights.CheckpointError, match=r"style\.safetensors: a LoRA"):
        latentdiff.load(tmp_path / "style.safetensors")


def test_what_cannot_be_inferred_is_an_error_not_a_guess():
    shapes = weights.expected_shapes(SD15)
    uneven = {k: v for k, v in shapes.items() if not k.startswith(UNET + "input_blocks.2.1.")}
    with pytest.raises(weights.CheckpointError, match="differ within a down level"):
        weights.detect(uneven)
    # heads are not in the weights, and 96 channels do not split into 64-channel heads
    odd = replace(SD21, unet=replace(SD21.unet, model_channels=96, channel_mult=(1, 2), transformer_depth=(1, 1)))
    with pytest.raises(weights.CheckpointError, match="64-channel heads"):
        weights.detect(weights.expected_shapes(odd))
    # a shape the inferred config does not reproduce is a named mismatch at load time, never a silent fix
    ff = dict(shapes, **{UNET + "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 640)})
    cfg = weights.detect(ff)
    with pytest.raises(weights.CheckpointError, match="ff.net.2.weight"):
        weights.check_keys("x", weights.expected_shapes(cfg), ff)


@pytest.mark.parametrize("name", ["ssd-1b", "bk-sdm-tiny", "sdxl"])
def test_new_shapes_convert_to_diffusers_and_back(name):
    from diffusers import UNet2DConditionModel

    from latentdiff.models.unet import UNetModel
    from latentdiff.weights.diffusers.unet import diffusers_config, to_diffusers

    cfg = unet_config_from(STANDINS[name][1])
    pooled = STANDINS[name][2][-1].projection_dim if cfg.adm_in_channels else 0
    with torch.device("meta"):
        ours = UNetModel(cfg).state_dict()
        theirs = UNet2DConditionModel(**diffusers_config(cfg, pooled)).state_dict()
    converted = to_diffusers(ours, cfg)
    assert sorted(set(converted) ^ set(theirs)) == []
    assert [k for k, v in converted.items() if v.shape != theirs[k].shape] == []
    assert unet_config_from(diffusers_config(cfg, pooled)) == cfg  # a folder we write reads back the same


def test_sdxl_refiner_preset_shapes():
    # the released refiner's structure (sgm sd_xl_refiner.yaml): conditioner.embedders.0 is bigG, adm 2560
    from latentdiff.config import SDXL_REFINER

    shapes = weights.expected_shapes(SDXL_REFINER)
    assert shapes[UNET + "label_emb.0.0.weight"] == (1536, 2560)
    assert shapes["conditioner.embedders.0.model.text_projection"] == (1280, 1280)
    assert not any(k.startswith("conditioner.embedders.1.") for k in shapes)
    # and its U-Net is the one of diffusers' published refiner unet/config.json, tensor for tensor
    from diffusers import UNet2DConditionModel

    from latentdiff.weights.diffusers.unet import to_diffusers

    published = _dcfg(block_out_channels=[384, 768, 1536, 1536], layers_per_block=2, use_linear_projection=True,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2560)
    assert unet_config_from(published) == SDXL_REFINER.unet
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in UNet2DConditionModel(**published).state_dict().items()}
    ours = {k[len(UNET):]: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith(UNET)}
    assert {k: tuple(v.shape) for k, v in to_diffusers(ours, SDXL_REFINER.unet).items()} == theirs
