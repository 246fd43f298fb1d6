"""ControlNet: files in both layouts, residuals and whole pipelines against diffusers, errors, canny, PNG, CLI.

Oracle: diffusers' ControlNetModel.from_unet on the tiny SD 1.x / SDXL models' diffusers twins, every weight
perturbed (zero convs and the hint encoder's zero conv_out made non-zero), saved as a diffusers folder.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from conftest import diffusers_twin, perturb, rel_err, tiny_pipe
from latentdiff.weights import CheckpointError
from latentdiff.weights.controlnet import CONTROL_PREFIX

diffusers = pytest.importorskip("diffusers")

PROMPT, NEG = "a lighthouse on a cliff", "fog"


def _image(seed=0, w=64, h=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sdxl"])
def setup(request, tmp_path_factory):
    """(our pipeline, diffusers twin, two diffusers ControlNets, their folders, ours loaded from the folders)."""
    root = tmp_path_factory.mktemp(request.param)
    pipe = tiny_pipe(request.param)
    dpipe = diffusers_twin(pipe, root / "model")
    nets, folders = [], []
    for k in range(2):
        net = diffusers.ControlNetModel.from_unet(dpipe.unet)
        perturb(net, 10 + k, std=0.2)
        net.save_pretrained(root / f"cn{k}")
        nets.append(net)
        folders.append(root / f"cn{k}")
    ours = [latentdiff.load_controlnet(f) for f in folders]
    return pipe, dpipe, nets, folders, ours


def _sd(module) -> dict:
    return {k: v for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- files ---------------------------------------------------------------------------------------------------


def test_original_layout_round_trip(setup, tmp_path):
    """Diffusers folder -> ours -> original layout (control_model.*) -> diffusers' from_single_file (SD 1.x; its
    converter has no label_emb for SDXL) and back into ours, with and without the prefix, as .safetensors and
    weights-only .pth, and back out as a diffusers folder: every tensor equal."""
    pipe, _, nets, folders, ours = setup
    cn = ours[0]
    single = tmp_path / "control_test.safetensors"
    latentdiff.save_controlnet(cn, single)
    from safetensors.torch import load_file, save_file

    raw = load_file(single)
    assert all(k.startswith(CONTROL_PREFIX) for k in raw)
    assert {"control_model.input_hint_block.14.weight", "control_model.zero_convs.3.0.weight",
            "control_model.middle_block_out.0.weight", "control_model.time_embed.0.weight"} <= raw.keys()
    if pipe.cfg.family == "sdxl":
        assert "control_model.label_emb.0.0.weight" in raw
    else:
        theirs = diffusers.ControlNetModel.from_single_file(single, config=str(folders[0]), local_files_only=True)
        assert _equal(_sd(theirs), _sd(nets[0]))
    # unprefixed .safetensors (no config in its metadata: architecture and heads from the weights) and .pth
    bare = tmp_path / "bare.safetensors"
    save_file({k[len(CONTROL_PREFIX):]: v for k, v in raw.items()}, bare)
    pth = tmp_path / "control_test.pth"
    torch.save(raw, pth)
    lone = tmp_path / "diffusers_format.safetensors"  # diffusers keys, no config.json beside it
    lone.write_bytes((folders[0] / "diffusion_pytorch_model.safetensors").read_bytes())
    for path in (single, bare, pth, lone):
        back = latentdiff.load_controlnet(path)
        assert back.cfg == cn.cfg, path
        assert _equal(_sd(back), _sd(cn)), path
    latentdiff.save_controlnet(latentdiff.load_controlnet(bare), tmp_path / "folder", format="diffusers")
    again = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder")
    assert _equal(_sd(again), _sd(nets[0]))


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_match_diffusers(setup, guess_mode):
    pipe, _, nets, _, ours = setup
    u = pipe.cfg.unet
    g = torch.Generator().manual_seed(0)
    x, ctx, hint = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, u.context_dim, generator=g), \
        torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([999.0, 321.5])
    kw, y = {}, None
    if u.adm_in_channels:
        from latentdiff.models.unet import sdxl_vector

        pooled, ids = torch.randn(2, ours[0].cfg.pooled_dim, generator=g), torch.tensor([[64, 64, 0, 0, 64, 64.0]] * 2)
        kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        y = sdxl_vector(pooled, ids, u.adm_in_channels)
    with torch.no_grad():
        down, mid = nets[0](x, t, ctx, hint, conditioning_scale=0.8, guess_mode=guess_mode, return_dict=False, **kw)
        our_down, our_mid = ours[0](x, t, ctx, y, hint)
    scales = torch.logspace(-1, 0, len(our_down) + 1) * 0.8 if guess_mode else torch.full((len(our_down) + 1,), 0.8)
    assert len(down) == len(our_down) == 4
    for a, b, s in zip(down, our_down, scales):
        assert rel_err(b * s, a) < 1e-5
    assert rel_err(our_mid * scales[-1], mid) < 1e-5
    assert our_mid.abs().max() > 0.1  # the zero convs are not zero: the comparison sees the weights


# --- pipelines ------------------------------------------------------------------------------------------------


def _diffusers_pipe(dpipe, nets):
    cls = (diffusers.StableDiffusionXLControlNetPipeline if "XL" in type(dpipe).__name__
           else diffusers.StableDiffusionControlNetPipeline)
    parts = {k: v for k, v in dpipe.components.items() if k != "image_encoder"}
    p = cls(**parts, controlnet=nets if len(nets) > 1 else nets[0])
    p.set_progress_bar_config(disable=True)
    return p


CASES = {  # name: (nets used, scale, start, end, guess mode)
    "scale0.7-window0.1-0.8": ([0], 0.7, 0.1, 0.8, False),
    "guess-mode": ([0], 0.7, 0.1, 0.8, True),
    "two-controlnets": ([0, 1], [0.7, 0.5], [0.1, 0.0], [0.8, 0.5], False),
    "two-controlnets-guess": ([0, 1], [0.7, 0.5], [0.0, 0.2], [1.0, 0.9], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_diffusers(setup, case):
    pipe, dpipe, nets, _, ours = setup
    which, scale, start, end, guess = CASES[case]
    images = [_image(k) for k in which]
    one = len(which) == 1
    dp = _diffusers_pipe(dpipe, [nets[k] for k in which])
    theirs = dp(PROMPT, image=images[0] if one else images, negative_prompt=NEG, num_inference_steps=10,
                guidance_scale=7.5, controlnet_conditioning_scale=scale, control_guidance_start=start,
                control_guidance_end=end, guess_mode=guess, generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent").images
    kw = dict(negative_prompt=NEG, steps=10, guidance_scale=7.5, seed=0, output="latent", progress=False)
    got = pipe(PROMPT, controlnet=ours[0] if one else [ours[k] for k in which],
               control_image=images[0] if one else images, controlnet_scale=scale, control_start=start,
               control_end=end, guess_mode=guess, **kw)
    assert rel_err(got, theirs) < 1e-3, rel_err(got, theirs)
    assert rel_err(pipe(PROMPT, **kw), theirs) > 0.05  # the ControlNet changed the result


def test_img2img_matches_diffusers(setup):
    pipe, dpipe, nets, _, ours = setup
    if pipe.cfg.family == "sdxl":
        pytest.skip("img2img + ControlNet is checked on SD 1.x (the same code path)")
    parts = {k: v for k, v in dpipe.components.items() if k != "image_encoder"}
    dp = diffusers.StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=nets[0])
    dp.set_progress_bar_config(disable=True)
    init, control = _image(3).resize((8, 8)).resize((64, 64), Image.BILINEAR), _image(4)
    theirs = dp(PROMPT, image=init, control_image=control, strength=0.6, negative_prompt=NEG,
                num_inference_steps=10, guidance_scale=7.5, controlnet_conditioning_scale=0.7,
                control_guidance_start=0.1, control_guidance_end=0.8, generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent").images
    got = pipe.img2img(PROMPT, init, strength=0.6, negative_prompt=NEG, steps=10, seed=0, output="latent",
                       progress=False, controlnet=ours[0], control_image=control, controlnet_scale=0.7,
                       control_start=0.1, control_end=0.8)
    assert rel_err(got, theirs) < 1e-3, rel_err(got, theirs)


def test_inpaint_9_channel_matches_diffusers(tmp_path):
    """A 4-channel ControlNet with a 9-channel inpainting U-Net: the ControlNet sees the latents alone, as in
    diffusers' StableDiffusionControlNetInpaintPipeline."""
    net = diffusers.ControlNetModel.from_unet(diffusers_twin(tiny_pipe("tiny-sd15"), tmp_path / "base").unet)
    perturb(net, 3, std=0.2)
    net.save_pretrained(tmp_path / "cn")
    pipe = tiny_pipe("tiny-sd15-inpaint")
    parts = {k: v for k, v in diffusers_twin(pipe, tmp_path / "inpaint").components.items() if k != "image_encoder"}
    dp = diffusers.StableDiffusionControlNetInpaintPipeline(**parts, controlnet=net)
    dp.set_progress_bar_config(disable=True)
    init, control = _image(1).resize((8, 8)).resize((64, 64), Image.BILINEAR), _image(2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    theirs = dp(PROMPT, image=init, mask_image=mask, control_image=control, strength=0.7, negative_prompt=NEG,
                num_inference_steps=10, guidance_scale=7.5, controlnet_conditioning_scale=0.7, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    got = pipe.inpaint(PROMPT, init, mask, strength=0.7, negative_prompt=NEG, steps=10, seed=0, output="latent",
                       progress=False, controlnet=latentdiff.load_controlnet(tmp_path / "cn"), control_image=control,
                       controlnet_scale=0.7)
    assert rel_err(got, theirs) < 1e-3, rel_err(got, theirs)


def test_control_image_resized_and_sets_size(setup):
    """A 128 px control image gives a 128 px output when no size is given; at 64 px it is resized (Lanczos, as
    diffusers' control image processor) and equals passing the resized image."""
    pipe, _, _, _, ours = setup
    kw = dict(steps=2, seed=0, output="latent", progress=False, controlnet=ours[0])
    big = _image(5, 128, 128)
    assert pipe(PROMPT, control_image=big, **kw).shape[-2:] == (16, 16)
    small = big.resize((64, 64), Image.LANCZOS)
    a = pipe(PROMPT, control_image=big, height=64, width=64, **kw)
    assert torch.equal(a, pipe(PROMPT, control_image=small, **kw))


def test_scale_zero_equals_no_controlnet(setup):
    pipe, _, _, _, ours = setup
    kw = dict(steps=3, seed=0, output="latent", progress=False)
    assert torch.equal(pipe(PROMPT, controlnet=ours[0], control_image=_image(), controlnet_scale=0.0, **kw),
                       pipe(PROMPT, **kw))


# --- errors -----------------------------------------------------------------------------------------------------


def test_sdxl_controlnet_on_sd1_pipeline_is_refused(tmp_path):
    xl = tiny_pipe("tiny-sdxl")
    net = diffusers.ControlNetModel.from_unet(diffusers_twin(xl, tmp_path / "xl").unet)
    net.save_pretrained(tmp_path / "cn")
    cn = latentdiff.load_controlnet(tmp_path / "cn")
    sd1 = tiny_pipe("tiny-sd15")
    before = _sd(cn)
    with pytest.raises(ValueError, match=r"context_dim 96 vs 32; adm_in_channels 256 vs 0") as e:
        sd1(PROMPT, controlnet=cn, control_image=_image(), steps=2, progress=False)
    assert "added-embedding width 256" in str(e.value)
    assert _equal(_sd(cn), before) and next(cn.parameters()).dtype == torch.float32


def test_wrong_control_image_ratio_is_refused(setup):
    pipe, _, _, _, ours = setup
    with pytest.raises(ValueError, match=r"control_image 0 is 64x32 .* the output 64x64 .* would be stretched"):
        pipe(PROMPT, controlnet=ours[0], control_image=_image(0, 64, 32), height=64, width=64, steps=2,
             progress=False)
    with pytest.raises(ValueError, match=r"control_image 1 is 32x64"):
        pipe(PROMPT, controlnet=ours, control_image=[_image(), _image(0, 32, 64)], steps=2, progress=False)


def test_bad_arguments_are_refused(setup):
    pipe, _, _, _, ours = setup
    kw = dict(steps=2, progress=False)
    with pytest.raises(ValueError, match=r"0 <= start < end <= 1, got 0.8, 0.2"):
        pipe(PROMPT, controlnet=ours[0], control_image=_image(), control_start=0.8, control_end=0.2, **kw)
    with pytest.raises(ValueError, match=r"controlnet_scale has 3 entries for 2 ControlNets"):
        pipe(PROMPT, controlnet=ours, control_image=[_image(), _image()], controlnet_scale=[1, 1, 1], **kw)
    with pytest.raises(ValueError, match=r"control_image has 1 entries for 2 ControlNets"):
        pipe(PROMPT, controlnet=ours, control_image=[_image()], **kw)
    with pytest.raises(ValueError, match="controlnet given without control_image"):
        pipe(PROMPT, controlnet=ours[0], **kw)
    with pytest.raises(ValueError, match="controlnet 0 is a ControlNetModel, not a latentdiff ControlNet"):
        pipe(PROMPT, controlnet=setup[2][0], control_image=_image(), **kw)


def test_missing_zero_convs_are_named(setup, tmp_path):
    _, _, _, _, ours = setup
    from safetensors.torch import load_file, save_file

    latentdiff.save_controlnet(ours[0], tmp_path / "full.safetensors")
    sd = load_file(tmp_path / "full.safetensors")
    for k in ("control_model.zero_convs.2.0.weight", "control_model.zero_convs.2.0.bias",
              "control_model.middle_block_out.0.weight"):
        del sd[k]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken.safetensors: missing zero convs middle_block_out.0.weight, "
                                              r"zero_convs.2.0.bias, zero_convs.2.0.weight \(3 tensors\)"):
        latentdiff.load_controlnet(tmp_path / "broken.safetensors")


def test_not_a_controlnet_is_refused(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    pipe.save(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a ControlNet: no input_hint_block.0.weight"):
        latentdiff.load_controlnet(tmp_path / "model.safetensors")


def test_pickle_with_a_global_is_refused(tmp_path):
    import collections

    torch.save({"input_hint_block.0.weight": torch.zeros(1), "x": collections.OrderedDict(a=print)},
               tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load"):
        latentdiff.load_controlnet(tmp_path / "evil.pth")


# --- preprocessors, PNG parameters, CLI --------------------------------------------------------------------------


def test_canny_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    from latentdiff.control import canny

    from PIL import ImageDraw

    photo = Image.new("RGB", (64, 64), (20, 30, 40))
    draw = ImageDraw.Draw(photo)
    draw.rectangle((8, 8, 30, 40), fill=(230, 220, 200))
    draw.ellipse((28, 20, 60, 58), fill=(90, 160, 60))  # strong edges (above 200) and a weaker one
    arr = np.asarray(photo)
    for low, high in ((100, 200), (50, 120)):
        got = np.asarray(canny(photo, low, high))
        expected = cv2.Canny(arr, low, high)
        assert got.shape == (64, 64, 3) and (got == expected[:, :, None]).all()
        assert expected.any() and not expected.all()  # the image has edges and non-edges at these thresholds


def test_png_parameters_carry_controlnet_entries(setup):
    pytest.importorskip("cv2")
    from latentdiff.control import canny
    from latentdiff.images import parse_parameters

    pipe, _, _, folders, ours = setup
    images = pipe(PROMPT, controlnet=ours, control_image=[canny(_image(1)), _image(2)], controlnet_scale=[0.7, 1.0],
                  control_start=[0.1, 0.0], control_end=[0.8, 1.0], steps=2, progress=False)
    text = images[0].info["parameters"]
    assert ('ControlNet 0: "Module: canny, Model: cn0, Weight: 0.7, Resize Mode: Just Resize, Threshold A: 100, '
            'Threshold B: 200, Guidance Start: 0.1, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced"'
            in text)
    assert ('ControlNet 1: "Module: none, Model: cn1, Weight: 1.0, Resize Mode: Just Resize, Guidance Start: 0.0, '
            'Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"' in text)
    assert parse_parameters(text)["steps"] == 2  # the quoted entries do not break reading the PNG back


def test_cli_generate_with_controlnet(setup, tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    from latentdiff import cli
    from latentdiff.images import read_png_parameters

    pipe, _, _, folders, ours = setup
    if pipe.cfg.family == "sdxl":
        pytest.skip("one family is enough for the command line")
    pipe.save(tmp_path / "model.safetensors")
    latentdiff.save_controlnet(ours[0], tmp_path / "control_canny.safetensors")
    _image(3).save(tmp_path / "photo.png")
    out = tmp_path / "out.png"
    cli.main(["generate", PROMPT, "-m", str(tmp_path / "model.safetensors"), "--controlnet",
              str(tmp_path / "control_canny.safetensors"), "--control-image", str(tmp_path / "photo.png"),
              "--control-scale", "0.5", "--canny", "--steps", "2", "--dtype", "fp32", "-o", str(out), "-q"])
    text = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: control_canny, Weight: 0.5,' in text
    assert read_png_parameters(out)["width"] == 64
    with pytest.raises(SystemExit, match="--controlnet FILE and --control-image IMG go together"):
        cli.main(["generate", PROMPT, "-m", str(tmp_path / "model.safetensors"), "--control-image",
                  str(tmp_path / "photo.png"), "-o", str(out), "-q"])


@pytest.mark.parametrize("preset, name", [("sd15", "sd15"), ("sdxl", "sdxl")])
def test_full_size_keys_equal_released_layout(preset, name):
    """The encoder copy has the released U-Net's encoder keys and shapes (checkpoint-layouts), and the ControlNet
    parts the released files' (wave2-formats 9.2): hint convs at 0, 2, ..., 14 (3 -> 16 ... 256 -> 320), one 1x1
    zero conv per input block (SD 1.x: 320 x4, 640 x3, 1280 x5) and middle_block_out."""
    from accelerate import init_empty_weights

    from conftest import layout
    from latentdiff.config import get_preset
    from latentdiff.models.controlnet import ControlNet, ControlNetConfig

    with init_empty_weights():
        cn = ControlNet(ControlNetConfig(unet=get_preset(preset).unet))
    ours = {k: list(v.shape) for k, v in cn.state_dict().items()}
    released = {k[len("model.diffusion_model."):]: shape for k, (shape, _) in layout(name).items()
                if k.startswith("model.diffusion_model.")}
    encoder = {k: v for k, v in released.items() if k.startswith(("input_blocks.", "middle_block.", "time_embed.",
                                                                   "label_emb."))}
    assert {k: v for k, v in ours.items() if k.split(".")[0] in ("input_blocks", "middle_block", "time_embed",
                                                                  "label_emb")} == encoder
    hint = {k: v for k, v in ours.items() if k.startswith("input_hint_block.") and k.endswith("weight")}
    assert sorted(int(k.split(".")[1]) for k in hint) == list(range(0, 16, 2))
    assert hint["input_hint_block.0.weight"] == [16, 3, 3, 3] and hint["input_hint_block.14.weight"][:2] == [
        320, 256]
    zero = [ours[f"zero_convs.{n}.0.weight"] for n in range(len(cn.input_blocks))]
    assert all(w[2:] == [1, 1] and w[0] == w[1] for w in zero)
    if preset == "sd15":
        assert [w[0] for w in zero] == [320] * 4 + [640] * 3 + [1280] * 5
    assert ours["middle_block_out.0.weight"] == [1280, 1280, 1, 1]


def test_sd2_controlnet_reads_and_matches_diffusers(tmp_path):
    """SD 2.x (linear projections): unprefixed original layout, as thibaud's files; no config in the file, so the
    heads come from the preset with these shapes."""
    from safetensors.torch import save_file

    pipe = tiny_pipe("tiny-sd21")
    net = diffusers.ControlNetModel.from_unet(diffusers_twin(pipe, tmp_path / "m").unet)
    perturb(net, 4, std=0.2)
    net.save_pretrained(tmp_path / "cn")
    cn = latentdiff.load_controlnet(tmp_path / "cn")
    assert cn.cfg.unet.use_linear_in_transformer and cn.cfg.unet.context_dim == 64
    save_file(dict(cn.state_dict()), tmp_path / "bare.safetensors")
    back = latentdiff.load_controlnet(tmp_path / "bare.safetensors")
    assert back.cfg == cn.cfg and _equal(_sd(back), _sd(cn))
    g = torch.Generator().manual_seed(1)
    x, ctx, hint = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        down, mid = net(x, torch.tensor([400.0]), ctx, hint, return_dict=False)
        our_down, our_mid = back(x, torch.tensor([400.0]), ctx, None, hint)
    assert all(rel_err(b, a) < 1e-5 for a, b in zip(down, our_down)) and rel_err(our_mid, mid) < 1e-5
