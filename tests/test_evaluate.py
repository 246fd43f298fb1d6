"""`latentdiff eval`: the scorer is proven on the generator's own scenes (and on blanks), then smoke-run on the
shipped shapes model."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff import evaluate
from latentdiff.datasets import shapes
from latentdiff.models.vae import DiagonalGaussian


class RenderingPipe:
    """A fake pipe that "generates" each caption by rendering a layout of it with the data generator."""

    def __call__(self, prompts, seed=0, **kw):
        layouts = [shapes._place(np.random.default_rng([seed, i]), shapes.parse_caption(p))
                   for i, p in enumerate(prompts)]
        return [Image.fromarray(shapes.render(objs)) for objs in layouts]


def blank_pipe(prompts, **kw):
    return [Image.new("RGB", (64, 64), "white") for _ in prompts]


def test_scorer_reads_the_generators_own_scenes():
    out = evaluate.evaluate_shapes(RenderingPipe(), seeds=(0, 1, 2))
    assert len(out["results"]) == 3 * 48
    assert {r["held_out"] for r in out["results"]} == {False, True}
    for name, row in out["summary"].items():
        for split, acc in row.items():
            assert acc >= 0.99, (name, split, acc)


def test_scorer_gives_blank_images_zero():
    out = evaluate.evaluate_shapes(blank_pipe, seeds=(0,))
    assert set(out["summary"]) >= {"correct", "single", "count", "relation", "single.color", "count.count",
                                   "relation.relation"}
    assert all(acc == 0.0 for row in out["summary"].values() for acc in row.values())


class ShiftVAE(torch.nn.Module):
    """Encodes to the image itself and decodes it `shift` 8-bit levels brighter."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift / 127.5))

    def encode(self, x):
        return DiagonalGaussian(torch.cat([x, torch.zeros_like(x)], 1))

    def decode(self, z):
        return z + self.shift


class IconPipe:
    """A fake pipe that "generates" each emoji name as its first vendored icon, shifted and noised (seeded)."""

    def __init__(self, shift: int, noise: float):
        from latentdiff.datasets.emoji import load_emoji

        images, captions = load_emoji("all")
        self.icons = {}
        for image, caption in zip(images, captions):
            self.icons.setdefault(evaluate.emoji_base(caption), image)
        self.shift, self.noise = shift, noise

    def __call__(self, prompts, seed=0, **kw):
        rng = np.random.default_rng(seed)
        out = []
        for p in prompts:
            x = np.roll(self.icons[p].astype(np.float32), (self.shift, -self.shift), axis=(0, 1))
            out.append(Image.fromarray(np.clip(x + rng.normal(0, self.noise, x.shape), 0, 255).astype(np.uint8)))
        return out


def test_emoji_ranker_recognises_the_icons_themselves():
    names = evaluate.emoji_eval_names()
    assert len(names) == 61 + 40 and sum(h for _, h in names) == 40
    exact = evaluate.evaluate_emoji(IconPipe(0, 0), names, seeds=(0,))
    assert all(r["rank"] == 0 for r in exact["results"])
    gallery = evaluate.EmojiGallery()
    icon = np.asarray(IconPipe(0, 0)(["red apple"])[0])
    assert gallery.nearest(icon) == "red apple" and gallery.rank(icon, "red apple") == 0
    assert gallery.rank(icon, "green apple") > 0
    # moved 2 px right and up, 8-bit noise of sd 12: still the nearest icon for most names (measured 0.93)
    moved = evaluate.evaluate_emoji(IconPipe(2, 12), names, seeds=(0, 1))
    assert moved["summary"]["top1"]["all"] >= 0.9, moved["summary"]
    assert moved["summary"]["top5"]["all"] >= moved["summary"]["top1"]["all"]


def test_emoji_ranker_on_blank_images_and_unknown_names():
    out = evaluate.evaluate_emoji(blank_pipe, seeds=(0,))
    assert out["summary"]["top1"]["all"] <= 0.02, out["summary"]
    assert min(r["rank"] for r in out["results"]) >= 0
    with pytest.raises(ValueError, match="'red aple' is not an emoji name"):
        evaluate.EmojiGallery().rank(np.zeros((64, 64, 3), np.uint8), "red aple")


def test_vae_psnr():
    images = np.random.default_rng(0).integers(64, 192, (5, 64, 64, 3), dtype=np.uint8)
    assert evaluate.vae_psnr(ShiftVAE(0), images, batch_size=2) > 100  # exact: mse clamped at 1e-10
    assert evaluate.vae_psnr(ShiftVAE(2), images, batch_size=2) == pytest.approx(20 * np.log10(255 / 2), abs=1e-3)


def test_eval_shapes_cli_on_the_shipped_model(capsys):
    evaluate.main(["shapes", "--seeds", "1", "--steps", "2", "--guidance", "3", "5"])
    out = capsys.readouterr().out
    headers = re.findall(r"guidance ([\d.]+), 2 steps .*48 captions x 1 seeds = 48 images", out)
    assert headers == ["3.0", "5.0"], out
    rows = re.findall(r"^  (\S+)\s+([\d.]+%|-)\s+([\d.]+%|-)\s+([\d.]+%|-)$", out, re.M)
    names = [r[0] for r in rows]
    assert names[:2] == ["correct", "single"] and "relation.relation" in names and len(names) == 2 * 17, out


def test_eval_emoji_cli_on_the_shipped_model(capsys):
    evaluate.main(["emoji", "--seeds", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert re.search(r"guidance [\d.]+, 2 steps .*101 emoji names x 1 seeds = 101 images", out), out
    rows = re.findall(r"^  (top[15])\s+([\d.]+%)\s+([\d.]+%)\s+([\d.]+%)$", out, re.M)
    assert [r[0] for r in rows] == ["top1", "top5"], out


def test_shipped_shapes_model_sanity_floor():
    # The 16 single-object captions at the model's defaults, seed 0. Measured (bf16, 2-core CPU): colour 75%,
    # shape 81%; the floor only catches a broken pipeline or checkpoint, not a small change in quality.
    singles = [c for c in shapes.eval_fixed_captions() if shapes.parse_caption(c)["kind"] == "single"]
    out = evaluate.evaluate_shapes(latentdiff.load("shapes"), singles, seeds=(0,))
    assert len(out["results"]) == 16
    assert out["summary"]["single.color"]["all"] > 0.3, out["summary"]
    assert out["summary"]["single.shape"]["all"] > 0.3, out["summary"]
