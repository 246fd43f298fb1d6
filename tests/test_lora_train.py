"""Adapter training (issue 24): LoRA / LoCon through train.py, written as kohya writes it (read back by our loader,
loaded by diffusers with the same latents), only the adapter trains and is checkpointed, exact resume after
SIGKILL, 2 accelerate processes on the shipped model as a diffusers folder."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import latentdiff
from conftest import rel_err, tiny_pipe
from test_train import _env, _losses, _train
from latentdiff.adapters.lora import LoraStack, lora_info, read_lora
from latentdiff.adapters.tags import short_hash
from latentdiff.train import checkpoint
from latentdiff.train.config import from_dict, load_train_config
from latentdiff.train.lora import LoRANetwork
from latentdiff.weights import SafetensorsFile

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs/train/lora-smoke.yaml"
PY = sys.executable
PROMPT, NEG = "a red circle", "a blue square"


def _cfg(tmp_path, **kw):
    base = load_train_config(str(SMOKE), []).to_dict()
    base.update(output_dir=str(tmp_path / "runs"), builtin_size=16, resolution=32, batch_size=2)
    base.update(kw)
    return from_dict(base)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A tiny SD 1.x single file with perturbed weights (no zero-initialised layers): the model adapted."""
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    tiny_pipe("tiny-sd15").save(path)
    return path


def _latents(pipe):
    return pipe(PROMPT, negative_prompt=NEG, guidance_scale=7.5, steps=4, seed=0, sampler="euler", height=64,
                width=64, output="latent", progress=False)


def _diffusers_latents(d):
    import diffusers

    d.scheduler = diffusers.EulerDiscreteScheduler.from_config(d.scheduler.config)
    d.set_progress_bar_config(disable=True)
    return d(PROMPT, negative_prompt=NEG, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
             generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images


def _tensors(path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(path)
    return {k: f.get(k).clone() for k in f.entries}


def test_kohya_file_reads_back_and_loads_in_diffusers(base_file, tmp_path):
    """A LoCon on U-Net + text encoder: every key is one the loader's kohya path reads (no problems, ranks 4 / 2,
    alphas 2 / 1), the ss_* metadata and sshs hashes are kohya's, and diffusers' load_lora_weights + set_adapters
    give latentdiff's load_lora latents."""
    import diffusers

    cfg = _cfg(tmp_path, init_from=str(base_file), steps=4, lr=2e-2, save_every=0)
    out = _train(cfg)
    path = out["export"]
    assert path == cfg.run_dir / "lora-smoke.safetensors"
    f = read_lora(path)
    info = lora_info(f)
    assert f.format == "kohya" and not f.problems and f.target == "SD 1.x"
    assert info["ranks"] == [2, 4] and info["alphas"] == [1.0, 2.0] and info["kinds"] == ["lora"]
    assert info["modules_per_part"]["text_encoders.0"] == 12  # 2 layers x q, k, v, out, fc1, fc2
    tensors = _tensors(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors  # LoCon: diffusers' SD1 names
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in tensors
    m = f.metadata
    assert m["ss_network_module"] == "networks.lora" and m["ss_network_dim"] == "4" and m["ss_network_alpha"] == "2.0"
    assert json.loads(m["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert m["ss_base_model_version"] == "sd_v1" and m["ss_resolution"] == "(32, 32)"
    assert m["ss_num_train_images"] == "16" and m["ss_steps"] == "4" and m["ss_output_name"] == "lora-smoke"
    assert float(m["ss_training_started_at"]) > 1e9
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert m["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()  # A1111's addnet hash of the file
    assert short_hash(path) == m["sshs_model_hash"][:12]
    ss_only = safetensors.torch.save(tensors, {k: v for k, v in m.items() if k.startswith("ss_")})
    assert m["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]

    pipe = latentdiff.load(base_file, dtype=torch.float32)
    base = _latents(pipe)
    pipe.load_lora(path, 0.8)
    ours = _latents(pipe)
    folder = tmp_path / "d"
    latentdiff.load(base_file, dtype=torch.float32).save(folder, format="diffusers")
    d = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    d.load_lora_weights(str(path), adapter_name="trained")
    d.set_adapters(["trained"], adapter_weights=[0.8])
    theirs = _diffusers_latents(d)
    assert rel_err(base, theirs) > 1e-2  # the trained LoRA matters
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
@torch.no_grad()
def test_training_forward_equals_the_merged_file(preset, tmp_path):
    """What training computes (hooks, and the open_clip in_proj parametrization) is what a loader merges from
    the written file: U-Net and text encoder outputs agree, SDXL's lora_te1_ / lora_te2_ q / k / v included."""
    from latentdiff.config import load_config
    from latentdiff.train.config import NetworkConfig

    net_cfg = NetworkConfig(type="locon", rank=3, alpha=1.5, conv_rank=2, conv_alpha=3.0,
                            targets=("unet", "text_encoder"))
    trained, merged = tiny_pipe(preset), tiny_pipe(preset)
    net = LoRANetwork(trained.unet, trained.text_encoders, net_cfg)
    g = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.attach()
    path = tmp_path / "l.safetensors"
    safetensors.torch.save_file(net.kohya_state_dict(torch.float32), str(path))
    if preset == "tiny-sdxl":
        keys = set(_tensors(path))
        assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight" in keys
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # SDXL: the original layout
    LoraStack(merged.unet, merged.text_encoders).add(path)
    cfg = load_config(preset)
    ids = trained.tokenizer(["a red circle on a blue square"], pad_id=cfg.text[0].pad_id)
    contexts = []
    for a, b in zip(trained.text_encoders, merged.text_encoders):
        (ha, pa), (hb, pb) = a(ids), b(ids)
        assert (ha - hb).abs().max() < 1e-5 and (pa - pb).abs().max() < 1e-5
        contexts.append(ha)
    context = torch.cat(contexts, -1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    y = torch.randn(1, cfg.unet.adm_in_channels, generator=g) if cfg.unet.adm_in_channels else None
    args = (x, torch.tensor([500.0]), context) + ((y,) if y is not None else ())
    oa, ob, plain = trained.unet(*args), merged.unet(*args), tiny_pipe(preset).unet(*args)
    assert (oa - ob).abs().max() < 1e-4 * ob.abs().max() and (oa - plain).abs().max() > 1e-2


def test_only_the_adapter_trains_and_is_checkpointed(base_file, tmp_path):
    """The optimizer holds only adapter tensors, and the checkpoint holds the adapter (fp32 on a bf16 base), its
    optimizer state and the data position: no base weight."""
    cfg = _cfg(tmp_path, init_from=str(base_file), steps=2, save_every=2, network={"type": "lora", "rank": 4},
               mixed_precision="bf16", validate_every=2, validation_steps=2)
    _train(cfg)
    assert (cfg.run_dir / "samples/step-00000002.png").is_file()  # the preview runs on the bf16 base
    state = checkpoint.load(checkpoint.latest(cfg.run_dir / "checkpoints"))
    assert list(state["model"]) == ["network"]
    net = state["model"]["network"]
    assert all(k.startswith("loras.lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight"))
               for k in net)
    assert all(v.dtype == torch.float32 for v in net.values())  # fp32 adapter on the bf16 base
    assert len(state["optimizer"]["state"]) == len(net)
    assert state["position"] == 2 and state["step"] == 2
    assert state["ema"] is None
    # beside the adapter: its two AdamW moments (and step counts), nothing the size of a base weight
    moments = [t for st in state["optimizer"]["state"].values() for k, t in st.items() if k != "step"]
    assert sum(t.numel() for t in moments) == 2 * sum(v.numel() for v in net.values())


def test_sigkill_during_save_resumes_to_the_same_adapter_bits(base_file, tmp_path):
    """4 steps straight == a run SIGKILLed while writing step 4's checkpoint, resumed from step 2's: the same
    adapter bits, the same file tensors."""
    kw = dict(init_from=str(base_file), steps=4, save_every=2, network={**load_train_config(str(SMOKE), [])
              .to_dict()["network"], "dropout": 0.1})  # dropout: the RNG state is resumed too
    straight = _cfg(tmp_path, run_name="straight", **kw)
    _train(straight)
    killed = _cfg(tmp_path, run_name="killed", **kw)
    args = [f"--{k}={json.dumps(v) if isinstance(v, (list, tuple, dict)) else v}" for k, v in killed.to_dict().items()
            if v is not None]
    r = subprocess.run([PY, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(_env(), **{checkpoint.KILL_HOOK: "4"}), timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [p.name for p in checkpoint.list_checkpoints(killed.run_dir / "checkpoints")] == ["ckpt-00000002.pt"]
    _train(from_dict({**killed.to_dict(), "resume": "latest"}))
    assert _losses(straight.run_dir) == _losses(killed.run_dir)
    a, b = _tensors(straight.run_dir / "straight.safetensors"), _tensors(killed.run_dir / "killed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_up.weight") and a[k].abs().max() > 0 for k in a)  # it trained
    sa = checkpoint.load(checkpoint.latest(straight.run_dir / "checkpoints"))
    sb = checkpoint.load(checkpoint.latest(killed.run_dir / "checkpoints"))
    assert all(torch.equal(v, sb["model"]["network"][k]) for k, v in sa["model"]["network"].items())
    ma = read_lora(straight.run_dir / "straight.safetensors").metadata
    assert ma["sshs_model_hash"] == read_lora(killed.run_dir / "killed.safetensors").metadata["sshs_model_hash"]


def test_diffusers_save_format_loads_in_diffusers(base_file, tmp_path):
    """save_format diffusers: PEFT keys and lora_adapter_metadata, read by our loader and by diffusers alike."""
    import diffusers

    cfg = _cfg(tmp_path, init_from=str(base_file), steps=3, lr=2e-2, save_every=0, save_format="diffusers")
    path = _train(cfg)["export"]
    keys = set(_tensors(path))
    assert all(k.startswith(("unet.", "text_encoder.")) and k.endswith(("lora_A.weight", "lora_B.weight"))
               for k in keys)
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    f = read_lora(path)
    assert f.format == "diffusers" and not f.problems and {e.scale for e in f.entries.values()} == {0.5}
    pipe = latentdiff.load(base_file, dtype=torch.float32)
    pipe.load_lora(path)
    folder = tmp_path / "d"
    latentdiff.load(base_file, dtype=torch.float32).save(folder, format="diffusers")
    d = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    d.load_lora_weights(str(path), adapter_name="trained")
    assert rel_err(_latents(pipe), _diffusers_latents(d)) < 1e-3


def test_two_processes_on_the_shipped_model_as_a_diffusers_folder(tmp_path):
    """accelerate launch --num_processes 2 train.py --config configs/train/lora-smoke.yaml on the shipped shapes
    model converted to a diffusers folder and the shapes data: ranks agree after every step, and the LoRA loads
    in diffusers with latentdiff's latents."""
    import diffusers

    folder = tmp_path / "shapes-diffusers"
    latentdiff.load("shapes", dtype=torch.float32).save(folder, format="diffusers")
    out = tmp_path / "runs"
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), "--config", str(SMOKE),
           f"--output_dir={out}", f"--init_from={folder}", "--resolution=32", "--steps=3", "--save_every=0",
           "--check_sync", "--lr=1e-2"]
    r = subprocess.run(cmd, cwd=tmp_path, env=dict(_env(), ACCELERATE_USE_CPU="true"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "lora-smoke/log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3] and all("weights_fingerprint" in x for x in recs)
    path = out / "lora-smoke/lora-smoke.safetensors"
    assert not read_lora(path).problems
    pipe = latentdiff.load(folder, dtype=torch.float32)
    kw = dict(prompt="a small red circle", guidance_scale=5.0, seed=0)
    base = pipe(**kw, steps=4, sampler="euler", output="latent", progress=False)
    pipe.load_lora(path)
    ours = pipe(**kw, steps=4, sampler="euler", output="latent", progress=False)
    d = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    d.scheduler = diffusers.EulerDiscreteScheduler.from_config(d.scheduler.config)
    d.set_progress_bar_config(disable=True)
    d.load_lora_weights(str(path), adapter_name="trained")
    d.set_adapters(["trained"], adapter_weights=[1.0])
    theirs = d(kw["prompt"], num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    assert rel_err(base, theirs) > 1e-3
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


def test_network_config_errors_and_overrides():
    cfg = load_train_config(str(SMOKE), ["--network.rank=8", "--save-format", "diffusers"])
    assert cfg.network.rank == 8 and cfg.network.conv_rank == 2 and cfg.save_format == "diffusers"
    assert cfg.text_trains and from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="network.type must be one of"):
        from_dict({"network": {"type": "loha"}})
    with pytest.raises(ValueError, match="unknown network option"):
        from_dict({"network": {"rnak": 4}})
    with pytest.raises(ValueError, match="network.targets"):
        from_dict({"network": {"targets": ["vae"]}})
    with pytest.raises(ValueError, match="train_text_encoder false"):
        from_dict({"network": {"type": "lora"}, "train_text_encoder": True})
    with pytest.raises(ValueError, match="save_precision must be one of"):
        from_dict({"save_precision": "fp8"})


@pytest.mark.parametrize("name", ["lora-sd15", "lora-sdxl"])
def test_gpu_configs_parse(name):
    """The real-run configs are valid options (they need a released model and GPUs, so they do not run here)."""
    cfg = load_train_config(str(REPO / f"configs/train/{name}.yaml"), [])
    assert cfg.network.type in ("lora", "locon") and cfg.network.rank >= 16 and cfg.mixed_precision == "bf16"
    assert cfg.gradient_checkpointing and cfg.optimizer == "adamw8bit" and cfg.save_precision == "fp16"
    assert cfg.resolution == (1024 if name == "lora-sdxl" else 512) and cfg.buckets


def test_dreambooth_prior_preservation(base_file, tmp_path, caplog):
    """class_prompt: class images generated by the frozen base model (image i from seed i), cached and reused,
    train beside the instance images (captioned instance_prompt) with weight prior_loss_weight."""
    import logging

    from latentdiff.train.dreambooth import class_folder

    kw = dict(init_from=str(base_file), network={"type": "lora", "rank": 2}, builtin_size=4, steps=3, save_every=0,
              instance_prompt="a photo of sks shape", class_prompt="a shape", class_images=2, caption_dropout=0.0)
    with caplog.at_level(logging.INFO, logger="latentdiff.train"):
        _train(_cfg(tmp_path, run_name="db1", prior_loss_weight=1.0, **kw))
    assert "data: 6 images" in caplog.text  # 4 instance + 2 class images, 3 batches of 2: all seen
    folders = list((tmp_path / "runs").glob("class-images-*"))
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == [
        "00000.png", "00000.txt", "00001.png", "00001.txt"]
    assert (folders[0] / "00001.txt").read_text() == "a shape"
    import numpy as np
    from PIL import Image

    pipe = latentdiff.load(base_file, dtype=torch.float32)
    want = pipe("a shape", seed=1, height=32, width=32, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(folders[0] / "00001.png")), np.asarray(want))
    mtime = (folders[0] / "00000.png").stat().st_mtime_ns
    _train(_cfg(tmp_path, run_name="db0", prior_loss_weight=0.0, **kw))
    assert (folders[0] / "00000.png").stat().st_mtime_ns == mtime  # reused
    l1, l0 = _losses(tmp_path / "runs/db1"), _losses(tmp_path / "runs/db0")
    assert l1.keys() == l0.keys() == {1, 2, 3} and l1 != l0  # the class samples' weight counts
    cfg = _cfg(tmp_path, run_name="db0", prior_loss_weight=0.0, **kw)
    assert class_folder(cfg, {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders}) == folders[0]
    with pytest.raises(ValueError, match="class_prompt .* needs instance_prompt"):
        from_dict({"class_prompt": "a dog", "class_images": 4})


def test_gradient_checkpointing_trains_the_same_adapter(base_file, tmp_path):
    """Recomputing the blocks in the backward pass (hooks and dropout included) gives the adapter of a plain run."""
    kw = dict(init_from=str(base_file), steps=2, save_every=0, network={"type": "lora", "rank": 4, "dropout": 0.2})
    a = _train(_cfg(tmp_path, run_name="plain", **kw))["export"]
    b = _train(_cfg(tmp_path, run_name="ckpt", gradient_checkpointing=True, **kw))["export"]
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-6
    assert any(ta[k].abs().max() > 0 for k in ta if k.endswith("lora_up.weight"))


def test_diffusers_format_refuses_open_clip_text_encoders_before_training(tmp_path):
    base = tmp_path / "xl.safetensors"
    tiny_pipe("tiny-sdxl").save(base)
    with pytest.raises(ValueError, match="OpenCLIP text encoders"):
        _train(_cfg(tmp_path, init_from=str(base), save_format="diffusers"))
    assert not (tmp_path / "runs").exists()
