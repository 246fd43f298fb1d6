"""Trainer (issue 5): multi-process run, exact resume, crash safety, gradient accumulation, the objective against
diffusers, bad data. Tiny model (tiny-sd15, 64x64 images -> 8x8 latents), a few steps each."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

import latentdiff
from latentdiff.train import checkpoint, data
from latentdiff.train.config import from_dict, load_train_config, parse_overrides
from latentdiff.train.loop import train

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs/train/smoke.yaml"
PY = sys.executable


def _cfg(tmp_path, **kw):
    base = load_train_config(str(SMOKE), []).to_dict()
    base.update(output_dir=str(tmp_path / "runs"), log_every=1, builtin_size=32, resolution=32, batch_size=2)
    base.update(kw)
    return from_dict(base)


def _train(cfg):
    AcceleratorState._reset_state(True)  # a fresh accelerate state per in-process run
    GradientState._reset_state()
    return train(cfg)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def test_two_processes(tmp_path):
    """accelerate, 2 CPU processes (gloo DDP): loss falls, ranks agree after every step, one file per save."""
    out = tmp_path / "runs"
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"), "--config", str(SMOKE),
           f"--output_dir={out}", "--steps=16", "--save_every=8", "--keep_last=10", "--log_every=1", "--check_sync",
           "--builtin_size=64", "--resolution=32", "--batch_size=4"]
    r = subprocess.run(cmd, cwd=tmp_path, env=dict(_env(), ACCELERATE_USE_CPU="true"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "smoke/log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == list(range(1, 17))
    assert all("weights_fingerprint" in x for x in recs)  # compared across ranks after every optimizer step
    assert "8 batches per process" in r.stderr  # 64 images / (batch 4 x 2 ranks)
    losses = [x["loss"] for x in recs]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    assert [p.name for p in checkpoint.list_checkpoints(out / "smoke/checkpoints")] == \
        ["ckpt-00000008.pt", "ckpt-00000016.pt"]
    assert not list((out / "smoke/checkpoints").glob(".*tmp"))
    pipe = latentdiff.load(out / "smoke/final.safetensors")
    assert pipe.cfg.name == "tiny-sd15"
    images = pipe("a red circle", steps=3, seed=0, progress=False)
    assert images[0].size == (64, 64) and np.asarray(images[0]).std() > 0


def test_exact_resume(tmp_path):
    """20 steps straight == 10 steps, stop, --resume latest, 10 more: same losses, bitwise-equal weights."""
    a = _cfg(tmp_path, run_name="straight", steps=20, save_every=0)
    _train(a)
    b = _cfg(tmp_path, run_name="split", steps=20, save_every=0, stop_at_step=10)
    _train(b)
    assert checkpoint.latest(b.run_dir / "checkpoints").name == "ckpt-00000010.pt"
    assert not (b.run_dir / "final.safetensors").exists()
    _train(from_dict({**b.to_dict(), "stop_at_step": 0, "resume": "latest"}))
    la, lb = _losses(a.run_dir), _losses(b.run_dir)
    assert sorted(lb) == list(range(1, 21))
    assert [la[s] for s in range(1, 21)] == [lb[s] for s in range(1, 21)]
    sa = checkpoint.load(checkpoint.latest(a.run_dir / "checkpoints"))
    sb = checkpoint.load(checkpoint.latest(b.run_dir / "checkpoints"))
    for part in ("model", "ema"):
        flat_a = sa[part]["unet"] if part == "model" else sa[part]
        flat_b = sb[part]["unet"] if part == "model" else sb[part]
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    assert all(torch.equal(sa["optimizer"]["state"][i]["exp_avg"], sb["optimizer"]["state"][i]["exp_avg"])
               for i in sa["optimizer"]["state"])


def test_resume_with_a_new_lr_uses_it(tmp_path):
    """A resume with a changed lr / weight decay trains with the new values (the optimizer's saved groups would
    otherwise bring back the old ones)."""
    b = _cfg(tmp_path, run_name="lr", steps=4, save_every=0, stop_at_step=2, lr=1e-3, warmup_steps=0)
    _train(b)
    _train(from_dict({**b.to_dict(), "stop_at_step": 0, "resume": "latest", "lr": 1e-5, "weight_decay": 0.5}))
    groups = checkpoint.load(checkpoint.latest(b.run_dir / "checkpoints"))["optimizer"]["param_groups"]
    assert groups[0]["base_lr"] == 1e-5 and groups[0]["weight_decay"] == 0.5
    assert 0 < groups[0]["lr"] <= 1e-5
    lr = [json.loads(line)["lr"] for line in (b.run_dir / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    assert lr[-1] <= 1e-5 < lr[0], lr


def test_sigkill_during_checkpoint_write(tmp_path):
    """Killed while writing step 6's checkpoint: step 3's is intact and the run resumes from it to the end."""
    cfg = _cfg(tmp_path, run_name="killed", steps=6, save_every=3)
    args = [f"--{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in cfg.to_dict().items()
            if v is not None]
    env = dict(_env(), **{checkpoint.KILL_HOOK: "6"})
    r = subprocess.run([PY, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    ckpts = cfg.run_dir / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["ckpt-00000003.pt"]
    assert len(list(ckpts.glob(".ckpt-00000006.pt.tmp"))) == 1  # the interrupted write
    assert checkpoint.load(ckpts / "ckpt-00000003.pt")["step"] == 3
    out = _train(from_dict({**cfg.to_dict(), "resume": "latest"}))
    assert out["step"] == 6 and (cfg.run_dir / "final.safetensors").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == ["ckpt-00000003.pt", "ckpt-00000006.pt"]
    assert not list(ckpts.glob(".*tmp"))


def test_grad_accumulation_equals_big_batch(tmp_path):
    one = _cfg(tmp_path, run_name="b4", steps=2, batch_size=4, grad_accum=1, ema_decay=0.0, save_every=0)
    two = _cfg(tmp_path, run_name="b2x2", steps=2, batch_size=2, grad_accum=2, ema_decay=0.0, save_every=0)
    _train(one)
    _train(two)
    la, lb = _losses(one.run_dir), _losses(two.run_dir)
    assert la.keys() == lb.keys() == {1, 2}
    assert all(abs(la[s] - lb[s]) < 1e-5 for s in la), (la, lb)
    wa = checkpoint.load(checkpoint.latest(one.run_dir / "checkpoints"))["model"]["unet"]
    wb = checkpoint.load(checkpoint.latest(two.run_dir / "checkpoints"))["model"]["unet"]
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    moved = max((wa[k] - w0).abs().max().item() for k, w0 in _initial_unet().items())
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)


def _initial_unet():
    from latentdiff import weights
    from latentdiff.config import load_config

    torch.manual_seed(0)
    return weights.build_modules(load_config("tiny-sd15"), meta=False)["unet"].state_dict()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_matches_diffusers(prediction_type):
    """Loss and AdamW-updated weights of one step equal those of diffusers' UNet2DConditionModel + DDPMScheduler."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from latentdiff.config import load_config
    from latentdiff.weights.diffusers.unet import diffusers_config, to_diffusers
    from latentdiff.models.unet import UNetModel
    from latentdiff.sampling.schedules import alphas_cumprod
    from latentdiff.train.objective import unet_loss

    cfg = load_config("tiny-sd15")
    torch.manual_seed(0)
    ours = UNetModel(cfg.unet)
    with torch.no_grad():
        for p in ours.parameters():  # the zero-initialised output conv would make the test vacuous
            p.normal_(0, 0.05)
    theirs = UNet2DConditionModel(**diffusers_config(cfg.unet))
    theirs.load_state_dict(to_diffusers(ours.state_dict(), cfg.unet), strict=True)
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    context, t = torch.randn(3, 77, 32, generator=g), torch.tensor([5, 480, 999])

    loss = unet_loss(lambda x, tt: ours(x, tt, context), latents, noise, t,
                     alphas_cumprod(cfg.beta_start, cfg.beta_end, 1000), prediction_type)
    sched = DDPMScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear",
                          prediction_type=prediction_type)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = theirs(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
    ref = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1, ref.item())

    for model, value in ((ours, loss), (theirs, ref)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        value.backward()
        opt.step()
    converted = to_diffusers(ours.state_dict(), cfg.unet)
    diff = max((converted[k] - v).abs().max().item() for k, v in theirs.state_dict().items())
    assert diff < 1e-5, diff


def test_min_snr_weights_match_diffusers_recipe():
    from diffusers.training_utils import compute_snr

    from latentdiff.sampling.schedules import alphas_cumprod
    from latentdiff.train.objective import snr_weights

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 10, 300, 999])
    snr = compute_snr(sched, t)
    base = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    a = alphas_cumprod(0.00085, 0.012, 1000)[t]
    torch.testing.assert_close(snr_weights(a, 5.0, "epsilon"), base / snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(snr_weights(a, 5.0, "v_prediction"), base / (snr + 1), rtol=1e-5, atol=0)


def test_bad_data(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("a", "b", "c", "d"):
        Image.fromarray(rgb).save(root / f"{name}.png")
    for name in ("a", "b", "c"):
        (root / f"{name}.txt").write_text(f"caption {name}\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = (root / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="latentdiff.train"):
        records, skipped = data.load_records(str(root), 0, 0)
    assert skipped == 2 and len(records) == 4
    assert {r.caption for r in records} == {"caption a", "caption b", "caption c", ""}
    assert "skipping unreadable image" in caplog.text and "broken.png" in caplog.text
    assert "truncated.png" in caplog.text
    assert "no caption for" in caplog.text and "d.png" in caplog.text

    # errors come before any work: no run folder is created
    with pytest.raises(data.DataError, match="does not exist"):
        _train(_cfg(tmp_path, run_name="missing", data=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty"):
        _train(_cfg(tmp_path, run_name="empty", data=str(tmp_path / "empty")))
    assert not (tmp_path / "runs").exists()

    # a folder trains: 4 readable images, one batch of 4, the empty caption included
    cfg = _cfg(tmp_path, run_name="folder", data=str(root), steps=1, ema_decay=0.0)
    _train(cfg)
    rec = json.loads((cfg.run_dir / "log.jsonl").read_text().splitlines()[0])
    assert rec["skipped_images"] == 2


def test_timestep_shift_draws_high_noise_more_often():
    """timestep_shift s maps u ~ U(0, 1) to T s u / (1 + (s - 1) u): the median t goes from T/2 to T s/(s + 1)."""
    from latentdiff.train.objective import draw

    keys = torch.arange(4000)
    plain, shifted = draw(keys, 0, (1, 1, 1), 1000), draw(keys, 0, (1, 1, 1), 1000, timestep_shift=3.0)
    assert abs(plain["t"].float().median() - 500) < 30 and abs(shifted["t"].float().median() - 750) < 30
    assert shifted["t"].min() >= 0 and shifted["t"].max() <= 999
    with pytest.raises(ValueError, match="timestep_shift must be > 0"):
        from_dict({"timestep_shift": 0})


def test_config_overrides_and_errors():
    d = parse_overrides(["--lr=1e-4", "--steps", "7", "--buckets", "--validation_prompts=[a, b]"])
    cfg = from_dict(d)
    assert cfg.lr == 1e-4 and cfg.steps == 7 and cfg.buckets is True and cfg.validation_prompts == ("a", "b")
    with pytest.raises(ValueError, match="unknown training option --lrr"):
        parse_overrides(["--lrr=1"])
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        from_dict({"mixed_precision": "fp8"})


def test_buckets_and_epoch_plan():
    buckets = data.make_buckets(64, 16, 2.0)
    assert (64, 64) in buckets and all(h * w <= 64 * 64 and h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    # 1:2 has no bucket at this size (32x64 is below the area, 32x128 too wide); 48x80 is the nearest aspect
    assert buckets[data.assign_bucket((100, 200), buckets)] == (48, 80)
    assert buckets[data.assign_bucket((300, 290), buckets)] == (64, 64)
    bucket_of = [0] * 10 + [1] * 7
    plans = [data.epoch_batches(bucket_of, 3, 0, 0, r, 2) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 2  # 3 + 2 full batches, dealt evenly to 2 ranks
    for plan in plans:
        for batch in plan:
            assert len({b for _, _, b in batch}) == 1  # one bucket per batch
    seen = [i for plan in plans for batch in plan for i, _, _ in batch]
    assert len(seen) == len(set(seen))


def test_vae_decoder_only_keeps_the_latents(tmp_path):
    """Decoder-only VAE fine-tuning (init_from a model): the encoder, hence every latent and the U-Net trained on
    them, is unchanged, the decoder moves, and the measured latent scale is kept."""
    from latentdiff.weights import SafetensorsFile

    base = tmp_path / "base.safetensors"
    _train(_cfg(tmp_path, run_name="base", steps=2, save_every=0))
    os.replace(tmp_path / "runs/base/final.safetensors", base)
    out = _train(_cfg(tmp_path, run_name="ft", mode="vae", init_from=str(base), vae_decoder_only=True, steps=3,
                      lr=1e-2, warmup_steps=0, save_every=0, ema_decay=0.0, data="builtin:emoji"))
    a, b = SafetensorsFile(base), SafetensorsFile(out["export"])
    enc = [k for k in a.entries if k.startswith("first_stage_model.encoder.") or "quant_conv" in k
           and "post" not in k]
    dec = [k for k in a.entries if k.startswith("first_stage_model.decoder.")]
    assert enc and all(torch.equal(a.get(k), b.get(k)) for k in enc)
    assert any(not torch.equal(a.get(k), b.get(k)) for k in dec)
    assert a.metadata["latentdiff_config"] == b.metadata["latentdiff_config"]


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_cache_gives_the_same_training(tmp_path, train_text_encoder):
    """cache_dir: the cached posteriors (and text embeddings, unless the text encoder trains) give the losses of
    the uncached run; a second run reuses the file instead of recomputing it."""
    kw = dict(steps=6, save_every=0, train_text_encoder=train_text_encoder)
    plain = _cfg(tmp_path, run_name="plain", **kw)
    _train(plain)
    cached = _cfg(tmp_path, run_name="cached", cache_dir=str(tmp_path / "cache"), **kw)
    _train(cached)
    files = list((tmp_path / "cache").glob("cache-*.safetensors"))
    assert len(files) == 1
    from safetensors import safe_open

    with safe_open(files[0], "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("mean.0").shape[0] == 32 and f.get_tensor("row").tolist() == list(range(32))
    assert {"mean.0", "std.0", "bucket", "row"} <= keys
    assert ("context.empty" in keys) is not train_text_encoder  # text embeddings change while the encoder trains
    lp, lc = _losses(plain.run_dir), _losses(cached.run_dir)
    assert sorted(lp) == sorted(lc) == list(range(1, 7))
    np.testing.assert_allclose([lc[s] for s in lp], [lp[s] for s in lp], rtol=1e-4)
    mtime = files[0].stat().st_mtime_ns
    _train(_cfg(tmp_path, run_name="again", cache_dir=str(tmp_path / "cache"), **kw))
    assert files[0].stat().st_mtime_ns == mtime and _losses(tmp_path / "runs/again") == lc


def test_cpu_threads(monkeypatch):
    """accelerate launch leaves OMP_NUM_THREADS=1 on small VMs; the trainer gives each local process its share of
    the usable cores, or LATENTDIFF_NUM_THREADS."""
    from latentdiff.train.loop import cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LATENTDIFF_NUM_THREADS", "1")
        cpu_threads(1)
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("LATENTDIFF_NUM_THREADS")
        cpu_threads(1)
        assert torch.get_num_threads() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count())
        cpu_threads(1000)  # more processes than cores: still one thread each
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_cache_fingerprint_follows_the_weights(tmp_path, train_text_encoder):
    """The cache file is keyed by the weights that compute it: a new U-Net (another init file, another
    prediction type) reuses the posteriors; a changed VAE, or a changed text encoder when text is cached, does
    not."""
    from latentdiff.train import cache

    pipe = latentdiff.from_config("tiny-sd15")
    tc = _cfg(tmp_path, train_text_encoder=train_text_encoder, init_from=str(tmp_path / "a.safetensors"))
    records = [data.Record(f"img{i}.png", f"caption {i}", (32, 32)) for i in range(3)]
    encoders = list(pipe.text_encoders)

    def key(tc=tc, cfg=pipe.cfg):
        return cache.fingerprint(tc, cfg, records, [(32, 32)], [0, 0, 0], pipe.vae, encoders)

    base = key()
    other_init = _cfg(tmp_path, train_text_encoder=train_text_encoder, init_from=str(tmp_path / "b.safetensors"))
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    assert key(other_init) == base
    if train_text_encoder:  # the U-Net side of the config does not matter either
        from dataclasses import replace
        assert key(cfg=replace(pipe.cfg, prediction_type="v_prediction")) == base
    with torch.no_grad():
        next(encoders[0].parameters()).add_(1.0)
    assert (key() == base) is train_text_encoder
    changed = key()
    with torch.no_grad():
        next(pipe.vae.parameters()).add_(1.0)
    assert key() != changed


def test_cache_layout_with_two_buckets():
    """The cache holds one posterior tensor per bucket: every image reads back its own posterior and text
    embedding, in any batch order, and a batch that mixes buckets is refused."""
    import latentdiff
    from latentdiff.train import cache
    from latentdiff.train.model import encode_ids, tokenize

    pipe = latentdiff.from_config("tiny-sd15")
    sizes, bucket_of = [(32, 32), (32, 48)], [0, 1, 0, 1, 1, 0, 0]
    g = torch.Generator().manual_seed(0)
    pixels = [torch.rand(3, *sizes[b], generator=g) * 2 - 1 for b in bucket_of]

    class Stub:
        def __len__(self):
            return len(pixels)

        def __getitem__(self, item):
            i, _, b = item
            assert b == bucket_of[i]
            return {"pixels": pixels[i], "caption": f"a caption number {i}"}

    encoders = list(pipe.text_encoders)
    c = cache.Cache(cache.compute(Stub(), bucket_of, pipe.vae, encoders, pipe.tokenizer, 3, "cpu", torch.float32))
    assert c.t["mean.0"].shape == (4, 4, 4, 4) and c.t["mean.1"].shape == (3, 4, 4, 6)
    for idx in ([6, 0, 2], [4, 1]):
        mean, std = c.posterior(idx, "cpu")
        with torch.no_grad():
            post = pipe.vae.encode(torch.stack([pixels[i] for i in idx]))
        torch.testing.assert_close(mean, post.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std, post.std, rtol=1e-4, atol=1e-5)
    context, _ = c.text([5, 3], [False, True], "cpu")
    with torch.no_grad():
        ref, _ = encode_ids(encoders, tokenize(pipe.tokenizer, encoders, ["a caption number 5", ""], "cpu"))
    torch.testing.assert_close(context, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="spans cache buckets"):
        c.posterior([0, 1], "cpu")
