"""WebDataset tar shards (issue 5, data): shard specs, the split by process and worker, bad samples, training on
shards with an exact resume. Tiny shards of the builtin shapes scenes, written here with tarfile."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

import latentdiff
from latentdiff.datasets.shapes import sample_batch
from latentdiff.train import checkpoint, webdata
from latentdiff.train.config import from_dict
from latentdiff.train.data import DataError
from latentdiff.train.loop import train


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """Shards train-00000{s}.tar of samples `s{s}-{j}`: .jpg for even j, .png for odd; caption starts with the key."""
    root.mkdir(exist_ok=True)
    images, captions = sample_batch(n_shards * per_shard, 0)
    for s in range(n_shards):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tar:
            for j in range(per_shard):
                key, buf = f"s{s}-{j}", io.BytesIO()
                fmt = "JPEG" if j % 2 == 0 else "PNG"
                Image.fromarray(images[s * per_shard + j]).save(buf, fmt)
                _add(tar, f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", buf.getvalue())
                _add(tar, f"{key}.txt", f"{key} {captions[s * per_shard + j]}".encode())
    return [str(root / f"train-{s:06d}.tar") for s in range(n_shards)]


def _keys(samples) -> list[str]:
    return [s["caption"].split()[0] for s in samples]


def _stream(shards, rank=0, world=1, epoch=0):
    st = webdata.ShardStream(shards, 32, 0, False, False, rank, world)
    st.epoch = epoch
    return st


def test_shard_specs(tmp_path):
    assert webdata.expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert webdata.expand_braces("{x,y}-{0..1}.tar") == ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]
    shards = make_shards(tmp_path / "shards", 3, 1)
    assert webdata.shard_list(str(tmp_path / "shards/train-{000000..000002}.tar")) == shards
    assert webdata.shard_list(str(tmp_path / "shards")) == shards  # a folder of .tar files
    assert webdata.shard_list(shards[1]) == shards[1:2]
    assert webdata.shard_list("builtin:shapes") is None
    (tmp_path / "imgs").mkdir()
    assert webdata.shard_list(str(tmp_path / "imgs")) is None  # an image folder
    with pytest.raises(DataError, match=r"2 of the 5 shards .* do not exist \(first: .*train-000003.tar\)"):
        webdata.shard_list(str(tmp_path / "shards/train-{000000..000004}.tar"))


def test_split_by_rank_covers_every_sample_once(tmp_path):
    shards = make_shards(tmp_path, 5, 3)  # 5 shards for 2 ranks: uneven on purpose
    everything = {f"s{s}-{j}" for s in range(5) for j in range(3)}
    for epoch in (0, 1):
        parts = [_keys(_stream(shards, rank, 2, epoch)) for rank in (0, 1)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(everything)
        assert {len(p) for p in parts} == {6, 9}  # whole shards: 2 and 3 of them
        assert _keys(_stream(shards, 0, 2, epoch)) == parts[0]  # deterministic
    assert _keys(_stream(shards, 0, 2, 0)) != _keys(_stream(shards, 0, 2, 1))  # reshuffled per epoch
    # keys (the seeds of each sample's noise) are unique across ranks and epochs
    keys = [s["key"] for e in (0, 1) for r in (0, 1) for s in _stream(shards, r, 2, e)]
    assert len(keys) == len(set(keys)) == 30


def test_split_by_worker(tmp_path):
    shards = make_shards(tmp_path, 4, 2)
    runs = []
    for _ in range(2):
        loader = torch.utils.data.DataLoader(_stream(shards), batch_size=None, num_workers=2)
        runs.append([(s["worker"], s["caption"].split()[0]) for s in loader])
    assert runs[0] == runs[1]  # the DataLoader's interleave of the workers is deterministic
    by_shard = {}
    for worker, key in runs[0]:
        by_shard.setdefault(key.split("-")[0], set()).add(worker)
    assert all(len(w) == 1 for w in by_shard.values()) and len(by_shard) == 4  # a shard belongs to one worker
    assert sorted(w for (w,) in by_shard.values()) == [0, 0, 1, 1]
    assert sorted(k for _, k in runs[0]) == sorted(f"s{s}-{j}" for s in range(4) for j in range(2))
    assert webdata.shards_for(shards, 0, 0, 1, 2, 1, 2) == webdata.shards_for(shards, 0, 0, 0, 1, 0, 1)[3::4]


def test_bad_samples(tmp_path, caplog):
    good = make_shards(tmp_path / "good", 1, 2)[0]
    with tarfile.open(good) as src:
        members = {m.name: src.extractfile(m).read() for m in src.getmembers()}
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        _add(tar, "broken.jpg", b"\xff\xd8\xff" + b"garbage" * 20)
        _add(tar, "broken.txt", b"a broken image")
        _add(tar, "truncated.png", members["s0-1.png"][: len(members["s0-1.png"]) // 2])
        _add(tar, "nocaption.jpg", members["s0-0.jpg"])
        _add(tar, "ok.png", members["s0-1.png"])
        _add(tar, "ok.txt", b"fine")
    with caplog.at_level(logging.WARNING, logger="latentdiff.train"):
        samples = list(_stream([str(bad)]))
    assert sorted(s["caption"] for s in samples) == ["", "fine"]
    assert max(s["skipped"] for s in samples) == 2
    assert "skipping unreadable image" in caplog.text and "broken.jpg" in caplog.text and "truncated.png" in caplog.text
    assert "no caption for" in caplog.text and "nocaption" in caplog.text
    assert all(s["pixels"].shape == (3, 32, 32) for s in samples)


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-sd15", output_dir=str(tmp_path / "runs"), resolution=32, batch_size=2, lr=1e-3,
                log_every=1, ema_decay=0.9, caption_dropout=0.1, peak_tflops=1.0)
    return from_dict({**base, **kw})


def _train(cfg):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(cfg)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def test_train_on_shards_and_resume_exactly(tmp_path):
    make_shards(tmp_path / "shards", 4, 1)  # 4 samples, batch 2: an epoch is 2 steps
    spec = str(tmp_path / "shards/train-{000000..000003}.tar")
    a = _cfg(tmp_path, run_name="straight", data=spec, steps=3)
    out = _train(a)
    assert out["step"] == 3
    recs = [json.loads(x) for x in (a.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 0, 1]
    pipe = latentdiff.load(out["export"])
    assert pipe.cfg.name == "tiny-sd15"
    assert pipe("a red circle", steps=2, seed=0, progress=False, height=32, width=32)[0].size == (32, 32)

    # stop in the middle of epoch 0, resume (replaying 1 batch, then into epoch 1): the same losses and weights
    b = _cfg(tmp_path, run_name="split", data=spec, steps=3, stop_at_step=1)
    _train(b)
    _train(from_dict({**b.to_dict(), "stop_at_step": 0, "resume": "latest"}))
    assert _losses(a.run_dir) == _losses(b.run_dir)
    wa = checkpoint.load(checkpoint.latest(a.run_dir / "checkpoints"))["model"]["unet"]
    wb = checkpoint.load(checkpoint.latest(b.run_dir / "checkpoints"))["model"]["unet"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_errors_before_any_work(tmp_path):
    with pytest.raises(DataError, match="do not exist"):
        _train(_cfg(tmp_path, data=str(tmp_path / "nope-{000..003}.tar")))
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(DataError, match="hold no readable image"):
        _train(_cfg(tmp_path, data=str(tmp_path / "empty.tar")))
    shard = make_shards(tmp_path / "one", 1, 2)[0]
    with pytest.raises(DataError, match="buckets are not supported"):
        _train(_cfg(tmp_path, data=shard, buckets=True))
    assert not (tmp_path / "runs").exists()
