"""Single files in the released layout: strict loading, detection, clear errors, no damage on failure."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from latentdiff import weights
from latentdiff.config import SD15, SD21, SDXL
from conftest import layout, tiny_pipe


def _released_style_file(pipe, path, dtype=torch.float16, extra=True):
    """A tiny model written with exactly the released key names (and the non-weight extras), no metadata."""
    sd = {k: v.to(dtype) for k, v in weights.state_dict_of(pipe.cfg, {
        "unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders}).items()}
    if extra:
        sd["alphas_cumprod"] = torch.zeros(1000)
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["model_ema.decay"] = torch.tensor(0.9999)
    save_file(sd, path)
    return sd


@pytest.mark.parametrize("name, base", [("sd15", SD15), ("sd21", SD21), ("sdxl", SDXL)])
def test_full_size_layouts_and_detection(name, base):
    ref = layout(name)
    shapes = {k: tuple(v[0]) for k, v in ref.items()}
    cfg = weights.detect(shapes)
    assert cfg.family == base.family and cfg.unet == base.unet
    expected = weights.expected_shapes(cfg)
    missing = set(expected) - set(shapes)
    extra = {k for k in set(shapes) - set(expected) if not weights.is_ignored(k)}
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
    assert all(expected[k] == shapes[k] for k in expected)


def test_inpainting_detected():
    shapes = {k: tuple(v[0]) for k, v in layout("sd15").items()}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert weights.detect(shapes).unet.in_channels == 9


def test_unknown_layout_lists_what_it_found():
    with pytest.raises(weights.CheckpointError, match="unknown checkpoint layout.*model.foo"):
        weights.detect({"model.foo.weight": (3,)})


def test_released_layout_file_loads_without_warnings(tmp_path, caplog):
    pipe = tiny_pipe("tiny-sd15")
    path = tmp_path / "tiny.safetensors"
    sd = _released_style_file(pipe, path)
    with caplog.at_level(logging.WARNING):
        loaded = latentdiff.load(path, config="tiny-sd15", dtype=torch.float16)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(loaded.unet.state_dict()[key[len("model.diffusion_model."):]], sd[key])
    assert loaded.unet.input_blocks[0][0].weight.dtype == torch.float16


def test_fp16_file_loads_as_bf16_and_fp32(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    path = tmp_path / "tiny.safetensors"
    _released_style_file(pipe, path)
    for dt in (torch.bfloat16, torch.float32):
        p = latentdiff.load(path, config="tiny-sd15", dtype=dt)
        assert {t.dtype for t in p.unet.parameters()} == {dt}


def test_converting_reads_drop_mapped_pages_but_never_a_view(tmp_path):
    # get(key, dtype) converts from the mapping, then drops the pages it read; a key also handed out as a
    # copy-on-write view keeps them, so writes to that view survive a later converting read.
    path = tmp_path / "t.safetensors"
    big = torch.randn(64, 1024, dtype=torch.float16)  # 128 KiB: spans whole pages
    save_file({"a": big, "b": big * 2}, path)
    f = weights.SafetensorsFile(path)
    assert torch.equal(f.get("a", torch.float32), big.float())
    assert torch.equal(f.get("a", torch.float32), big.float())  # dropped pages read back from the file
    view = f.get("b")
    view.zero_()
    assert torch.equal(f.get("b", torch.float32), torch.zeros(64, 1024))
    assert torch.equal(view, torch.zeros_like(view))
    assert torch.equal(weights.SafetensorsFile(path).get("b"), big * 2)  # the file itself never changes


def test_read_in_background_returns_every_tensor_and_stops_on_an_error():
    import threading
    import time

    jobs = {f"k{i}": (lambda i=i: torch.full((2,), float(i))) for i in range(5)}
    with weights.read_in_background(jobs) as tensors:
        read = tensors()
    assert list(read) == list(jobs) and torch.equal(read["k3"], torch.full((2,), 3.0))

    def broken():
        raise weights.CheckpointError("bad tensor k1")
    with pytest.raises(weights.CheckpointError, match="bad tensor k1"):  # a job's error reaches the caller
        with weights.read_in_background({"k0": jobs["k0"], "k1": broken}) as tensors:
            tensors()

    started, ran = threading.Event(), []

    def slow(i):
        started.set()
        time.sleep(0.2)
        ran.append(i)
        return torch.zeros(1)
    with pytest.raises(RuntimeError, match="the caller failed"):  # e.g. check_keys raising while it reads
        with weights.read_in_background({i: (lambda i=i: slow(i)) for i in range(100)}):
            started.wait(5)
            raise RuntimeError("the caller failed")
    assert ran == [0]  # the worker finished its current job, took no other, and had ended by the time we got here
    assert not any(t.name.startswith("latentdiff-read") for t in threading.enumerate())


def test_saved_file_round_trips_with_config(tmp_path):
    pipe = tiny_pipe("tiny-sdxl")
    pipe.save(tmp_path / "x.safetensors")
    again = latentdiff.load(tmp_path / "x.safetensors", dtype=torch.float32)  # no config argument: read from the metadata
    assert again.cfg == pipe.cfg
    for a, b in zip(pipe.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)


def _errors(tmp_path, sd, name):
    path = tmp_path / name
    save_file(sd, path)
    before = path.read_bytes()
    with pytest.raises(weights.CheckpointError) as e:
        latentdiff.load(path, config="tiny-sd15")
    assert str(path) in str(e.value)
    assert path.read_bytes() == before  # a failed load changes nothing
    return str(e.value)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    sd = _released_style_file(pipe, tmp_path / "ok.safetensors")
    key = "model.diffusion_model.out.2.weight"
    bad = dict(sd, **{key: torch.zeros(4, 3, 3, 3, dtype=torch.float16)})
    assert key in _errors(tmp_path, bad, "shape.safetensors") and "[4, 3, 3, 3]" in _errors(
        tmp_path, bad, "shape2.safetensors")
    gone = "first_stage_model.decoder.conv_out.bias"
    missing = {k: v for k, v in sd.items() if k != gone}
    msg = _errors(tmp_path, missing, "missing.safetensors")
    assert "missing" in msg and gone in msg


def test_truncated_and_foreign_files(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    good = tmp_path / "good.safetensors"
    _released_style_file(pipe, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        latentdiff.load(cut, config="tiny-sd15")
    head = tmp_path / "head.safetensors"
    head.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(weights.CheckpointError, match="header claims"):
        latentdiff.load(head)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    with pytest.raises(weights.CheckpointError, match="safetensors"):
        latentdiff.load(foreign)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": evil}, path)
    with pytest.raises(weights.CheckpointError, match="refused"):
        latentdiff.load(path)
    assert not marker.exists()


def test_safe_ckpt_loads(tmp_path):
    pipe = tiny_pipe("tiny-sd15")
    sd = weights.state_dict_of(pipe.cfg, {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": pipe.text_encoders})
    torch.save({"state_dict": sd, "global_step": 5}, tmp_path / "m.ckpt")
    loaded = latentdiff.load(tmp_path / "m.ckpt", config="tiny-sd15", dtype=torch.float32)
    assert torch.equal(loaded.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)


def test_prediction_type_order(tmp_path, caplog):
    pipe = tiny_pipe("tiny-sd21")
    path = tmp_path / "m.safetensors"
    _released_style_file(pipe, path, extra=False)
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        p = latentdiff.load(path, config="tiny-sd21", prediction_type="v_prediction")
    assert p.cfg.prediction_type == "v_prediction" and "prediction_type argument" in caplog.text
    with pytest.raises(ValueError, match="prediction_type"):
        latentdiff.load(path, config="tiny-sd21", prediction_type="x0")
