"""Textual-inversion training (issue 24): only the new vectors train; the A1111 file they are saved as loads in
diffusers' load_textual_inversion and gives latentdiff's load_embedding latents; SDXL saves clip_l + clip_g."""
from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import latentdiff
from conftest import rel_err, tiny_pipe
from latentdiff.adapters.embeddings import read_embedding
from latentdiff.train import checkpoint
from latentdiff.train.config import from_dict
from latentdiff.train.loop import train
from latentdiff.weights import SafetensorsFile

TOKEN = "tinytok"


def _train(tmp_path, base, **kw):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = from_dict({"run_name": "ti", "output_dir": str(tmp_path / "runs"), "init_from": str(base),
                     "data": "builtin:shapes", "builtin_size": 8, "resolution": 32, "batch_size": 2, "steps": 4,
                     "lr": 5e-2, "ema_decay": 0.0, "save_every": 4, "log_every": 1, "caption_dropout": 0.0,
                     "network": {"type": "embedding", "token": TOKEN, "vectors": 2, "init": "red circle"},
                     "instance_prompt": f"a photo of {TOKEN}", **kw})
    return cfg, train(cfg)


def test_sd15_embedding_trains_only_its_vectors_and_loads_in_diffusers(tmp_path):
    import diffusers

    src = tiny_pipe("tiny-sd15")
    base = tmp_path / "tiny.safetensors"
    src.save(base)
    cfg, out = _train(tmp_path, base)
    path = out["export"]
    assert path.name == f"{TOKEN}.safetensors"
    f = SafetensorsFile(path)
    assert list(f.entries) == ["emb_params"] and f.shapes()["emb_params"] == (2, 32)
    state = checkpoint.load(checkpoint.latest(cfg.run_dir / "checkpoints"))
    assert list(state["model"]) == ["embedding"] and list(state["model"]["embedding"]) == ["0"]
    assert len(state["optimizer"]["state"]) == 1  # one (2, 32) parameter: the token table is not in it
    emb = read_embedding(path)
    assert emb.token == TOKEN
    with torch.no_grad():
        init = src.text_encoders[0].embed_tokens(torch.tensor([src.tokenizer.encode("red circle")]))[0]
    assert (emb.vectors[0] - init).abs().max() > 1e-2  # trained away from the init words

    pipe = latentdiff.load(base, dtype=torch.float32)
    assert pipe.load_embedding(path) == TOKEN
    prompt, kw = f"a photo of {TOKEN}", dict(guidance_scale=5.0, seed=0)
    ours = pipe(prompt, **kw, steps=4, sampler="euler", height=64, width=64, output="latent", progress=False)
    plain = pipe("a photo of red circle", **kw, steps=4, sampler="euler", height=64, width=64, output="latent",
                 progress=False)
    folder = tmp_path / "d"
    src.save(folder, format="diffusers")
    d = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    d.load_textual_inversion(str(path), token=TOKEN)  # emb_params: diffusers needs the token (wave2 5.3)
    d.scheduler = diffusers.EulerDiscreteScheduler.from_config(d.scheduler.config)
    d.set_progress_bar_config(disable=True)
    theirs = d(prompt, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images
    assert rel_err(plain, theirs) > 1e-3
    assert rel_err(ours, theirs) < 1e-3, rel_err(ours, theirs)


def test_sdxl_embedding_saves_clip_l_and_clip_g(tmp_path):
    base = tmp_path / "xl.safetensors"
    tiny_pipe("tiny-sdxl").save(base)
    cfg, out = _train(tmp_path, base, steps=2, save_every=0, validate_every=2, validation_steps=2,
                      validation_prompts=[f"a {TOKEN}"])
    assert (cfg.run_dir / "samples/step-00000002.png").is_file()
    f = SafetensorsFile(out["export"])
    assert f.shapes() == {"clip_l": (2, 32), "clip_g": (2, 64)}
    emb = read_embedding(out["export"])
    pipe = latentdiff.load(base, dtype=torch.float32)
    pipe.load_embedding(out["export"])
    assert pipe(f"{TOKEN}, a square", steps=2, seed=0, output="latent", progress=False).isfinite().all()
    assert [v.shape for v in emb.vectors] == [(2, 32), (2, 64)]


def test_token_in_no_caption_is_an_error(tmp_path):
    base = tmp_path / "tiny.safetensors"
    tiny_pipe("tiny-sd15").save(base)
    with pytest.raises(ValueError, match="is in no caption"):
        _train(tmp_path, base, instance_prompt=None)
