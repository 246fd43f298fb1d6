"""The built-in datasets: shapes (grammar, held-out rule, checker, determinism) and the vendored emoji."""

import io
import json
import re
import tarfile

import numpy as np
import pytest

from latentdiff.datasets import build
from latentdiff.datasets import emoji, shapes

# Written out independently of shapes.py's regexes, straight from issue 6's grammar.
COLOR = "(red|orange|yellow|green|blue|purple|black)"
SHAPE = "(circle|square|triangle|diamond)"
POSITION = ("(at the top left|at the top|at the top right|on the left|in the center|on the right|"
            "at the bottom left|at the bottom|at the bottom right)")
GRAMMAR = re.compile(
    rf"a (small|large) {COLOR} {SHAPE} {POSITION}"
    rf"|(two|three|four) small {COLOR} {SHAPE}s"
    rf"|(a (red|yellow|green|blue|purple|black)|an orange) {SHAPE} (to the left of|to the right of|above|below) "
    rf"(a (red|yellow|green|blue|purple|black)|an orange) {SHAPE}"
)
HELD_OUT = re.compile(r"green circle|purple square|yellow triangle|orange diamond")


@pytest.fixture(scope="module")
def scenes():
    images, captions = shapes.sample_batch(2000, seed=0)
    return images, captions


def test_captions_follow_grammar_and_kinds_are_balanced(scenes):
    images, captions = scenes
    assert images.shape == (2000, 64, 64, 3) and images.dtype == np.uint8
    assert all(GRAMMAR.fullmatch(c) for c in captions), [c for c in captions if not GRAMMAR.fullmatch(c)][:5]
    kinds = [shapes.parse_caption(c)["kind"] for c in captions]
    assert all(600 < kinds.count(k) < 730 for k in shapes.KINDS)
    assert all(shapes.format_caption(shapes.parse_caption(c)) == c for c in captions)


def test_parse_rejects_captions_outside_the_grammar():
    for bad in ["a medium red circle in the center", "an red circle above a blue square",
                "a red circle above a red square", "five small red circles", "a red circle"]:
        with pytest.raises(ValueError, match="shapes grammar"):
            shapes.parse_caption(bad)


def test_held_out_rule():
    assert shapes.is_held_out("two small green circles")
    assert shapes.is_held_out("a red square above an orange diamond")
    assert shapes.is_held_out("a large purple square at the top")
    assert not shapes.is_held_out("a small green square at the top")
    assert not shapes.is_held_out("a yellow circle below a green triangle")
    _, train = shapes.sample_batch(300, seed=1, split="train")
    _, held = shapes.sample_batch(300, seed=1, split="held_out")
    assert not any(HELD_OUT.search(c) for c in train)
    assert all(HELD_OUT.search(c) for c in held)
    assert {shapes.parse_caption(c)["kind"] for c in held} == set(shapes.KINDS)


def test_fixed_eval_captions():
    captions = shapes.eval_fixed_captions()
    assert captions == shapes.eval_fixed_captions() and len(set(captions)) == len(captions) == 48
    assert sum(map(shapes.is_held_out, captions)) == 24
    assert all(GRAMMAR.fullmatch(c) for c in captions)


def test_scenes_are_deterministic():
    a, ca = shapes.sample_batch(16, seed=7)
    b, cb = shapes.sample_batch(16, seed=7)
    c, cc = shapes.sample_batch(16, seed=8)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c) and ca != cc
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(shapes.render_scene(rng1, "relation")[0], shapes.render_scene(rng2, "relation")[0])


def test_colours_are_faithful_and_edges_antialiased():
    objs = [shapes.Obj("purple", "circle", 12.0, 32.0, 32.0)]
    image = shapes.render(objs)
    assert tuple(image[32, 32]) == shapes.PALETTE["purple"] and tuple(image[2, 2]) == (255, 255, 255)
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(colours) > 5  # blends of purple and white along the edge


def test_checker_reads_the_generators_own_images(scenes):
    images, captions = scenes
    results = [shapes.check(im, c) for im, c in zip(images, captions)]
    accuracy = np.mean([r["correct"] for r in results])
    assert accuracy >= 0.99, accuracy
    for kind in shapes.KINDS:
        assert np.mean([r["correct"] for r in results if r["kind"] == kind]) >= 0.98


def _corrupt(parsed: dict, rng: np.random.Generator) -> dict[str, dict]:
    """Wrong captions for one scene, keyed by the attribute the checker must flag."""
    other = lambda options, now: [o for o in options if o != now][rng.integers(len(options) - 1)]  # noqa: E731
    wrong = {}
    if parsed["kind"] == "relation":
        # Colours swapped: each colour now names the other object, so the relation reads backwards.
        wrong["swap"] = {**parsed, "first": parsed["second"], "second": parsed["first"]}
        wrong["shape"] = {**parsed, "first": (parsed["first"][0], other(shapes.SHAPES, parsed["first"][1]))}
        flip = {"to the left of": "to the right of", "to the right of": "to the left of",
                "above": "below", "below": "above"}
        wrong["relation"] = {**parsed, "relation": flip[parsed["relation"]]}
        wrong["color"] = {**parsed, "second": (other([c for c in shapes.PALETTE if c != parsed["first"][0]],
                                                     parsed["second"][0]), parsed["second"][1])}
        return wrong
    wrong["color"] = {**parsed, "color": other(list(shapes.PALETTE), parsed["color"])}
    wrong["shape"] = {**parsed, "shape": other(shapes.SHAPES, parsed["shape"])}
    if parsed["kind"] == "single":
        wrong["position"] = {**parsed, "position": other(shapes.POSITIONS, parsed["position"])}
        wrong["size"] = {**parsed, "size": "large" if parsed["size"] == "small" else "small"}
    else:
        wrong["count"] = {**parsed, "n": other([2, 3, 4], parsed["n"])}
    return wrong


def test_checker_rejects_wrong_captions(scenes):
    images, captions = scenes
    rng = np.random.default_rng(0)
    flagged, rejected, total = 0, 0, 0
    for image, caption in zip(images[:400], captions[:400]):
        for attribute, parsed in _corrupt(shapes.parse_caption(caption), rng).items():
            result = shapes.check(image, shapes.format_caption(parsed))
            rejected += not result["correct"]
            flagged += not result["relation" if attribute == "swap" else attribute]
            total += 1
    assert total > 1200
    assert rejected / total >= 0.98 and flagged / total >= 0.98, (rejected / total, flagged / total)


def test_checker_on_empty_and_wrong_images():
    blank = np.full((64, 64, 3), 255, np.uint8)
    result = shapes.check(blank, "a small red circle at the top")
    assert result == {"kind": "single", "count": False, "color": False, "shape": False, "size": False,
                      "position": False, "correct": False}
    two = shapes.render([shapes.Obj("red", "square", 6.0, 15.0, 32.0), shapes.Obj("blue", "circle", 6.0, 48.0, 32.0)])
    assert shapes.check(two, "a red square to the left of a blue circle")["correct"]
    assert not shapes.check(two, "a red square to the left of a blue circle".replace("left", "right"))["relation"]
    assert not shapes.check(two, "a small red square on the left")["count"]
    with pytest.raises(ValueError, match="image must be uint8"):
        shapes.check(two.astype(np.float32), "a small red square on the left")


# ------------------------------------------------------------------------------------------------ emoji

def test_emoji_asset_loads():
    images, captions = emoji.load_emoji()
    assert images.dtype == np.uint8 and images.shape == (len(captions), 64, 64, 3) and len(captions) > 3000
    assert {"red apple", "woman mage, light skin tone", "woman mage, medium-dark skin tone",
            "vertical traffic light", "backhand index pointing right"} <= set(captions)
    assert sum(c.endswith("skin tone") for c in captions) > 1400
    assert (images[:, 0, 0] == 255).all(-1).mean() > 0.99  # corners white: composited on white, with padding
    assert images.mean() > 150 and images.std() > 50  # real pictures, not blank


def test_emoji_held_out_split_keeps_tone_families_together():
    all_images, all_captions = emoji.load_emoji()
    train_images, train = emoji.load_emoji("train")
    held_images, held = emoji.load_emoji("held_out")
    assert len(train) + len(held) == len(all_captions) and 100 < len(held) < 250
    assert set(train).isdisjoint(held) and train_images.shape[1:] == held_images.shape[1:] == (64, 64, 3)
    base = lambda c: c.split(",")[0]  # noqa: E731
    assert {base(c) for c in train}.isdisjoint({base(c) for c in held})
    with pytest.raises(ValueError, match="split"):
        emoji.load_emoji("test")


def test_captions_from_names():
    names = {"woman-mage", *(f"woman-mage-{t}" for t in emoji.SKIN_TONES), "vertical-traffic-light", "red-apple"}
    assert emoji.caption_from_name("woman-mage-medium-light", names) == "woman mage, medium-light skin tone"
    assert emoji.caption_from_name("woman-mage-light", names) == "woman mage, light skin tone"
    assert emoji.caption_from_name("vertical-traffic-light", names) == "vertical traffic light"
    assert emoji.caption_from_name("red-apple", names) == "red apple"


def test_build_emoji_from_a_tarball(tmp_path):
    pytest.importorskip("cairosvg")
    icon_set = {"prefix": "t", "width": 32, "height": 32, "icons": {
        "red-square": {"body": '<path fill="#ff0000" d="M8 8h16v16H8z"/>'},
        "left-half": {"body": '<path fill="#0000ff" d="M0 0h16v32H0z"/>'},
        "old-name": {"body": '<path d="M0 0h1v1H0z"/>', "hidden": True}},
        "aliases": {"right-half": {"parent": "left-half", "hFlip": True}, "same": {"parent": "red-square"}}}
    tarball = tmp_path / "icons.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in [("package/icons.json", icon_set), ("package/package.json", {"version": "9.9.9"})]:
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    path = emoji.build_emoji(tmp_path / "out", tarball=tarball)
    with np.load(path) as f:
        images, names, captions = f["images"], f["names"].tolist(), f["captions"].tolist()
    assert names == ["left-half", "red-square", "right-half"] and captions[1] == "red square"
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    red, left, right = images[1], images[0], images[2]
    assert tuple(red[32, 32]) == (255, 0, 0) and tuple(red[4, 4]) == (255, 255, 255)
    assert tuple(left[32, 8]) == (0, 0, 255) and tuple(left[32, 56]) == (255, 255, 255)
    assert np.array_equal(right, left[:, ::-1])  # hFlip alias is the mirror image
    assert "MIT License" in (tmp_path / "out" / "LICENSE-fluent-emoji").read_text()


def test_build_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="name must be 'emoji'"):
        build("shapes")
