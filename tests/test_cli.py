"""The command line: generate with the shipped model, re-create from the PNG parameters, batches as grids."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from latentdiff import cli
from latentdiff.images import parse_parameters


def test_generate_and_recreate_from_png(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    cli.main(["generate", "red apple", "-o", str(a), "--steps", "3", "--seed", "5", "--cfg", "4", "-q",
              "--sampler", "euler", "--schedule", "karras", "-n", "blurry"])
    params = parse_parameters(Image.open(a).info["parameters"])
    assert params == {"prompt": "red apple", "negative_prompt": "blurry", "steps": 3, "sampler": "euler",
                      "schedule": "karras", "guidance_scale": 4.0, "seed": 5, "width": 64, "height": 64}
    cli.main(["generate", "--from-png", str(a), "-o", str(b), "-q"])
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert "seed 5" in capsys.readouterr().out


def test_batch_is_saved_as_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    cli.main(["generate", "rocket", "--num-images", "4", "--steps", "2", "-o", str(out), "-q"])
    assert Image.open(out).size == (128, 128)


def test_a1111_parameters_are_understood():
    text = "a cat, (masterpiece:1.2)\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, " \
           "CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abc, Model: x"
    p = parse_parameters(text)
    assert p["sampler"] == "dpmpp_2m" and p["schedule"] == "karras" and (p["width"], p["height"]) == (512, 768)
    with pytest.raises(ValueError, match="Steps"):
        parse_parameters("just a prompt")


def test_bad_option_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="steps"):
        cli.main(["generate", "x", "--steps", "0", "-o", str(tmp_path / "x.png"), "-q"])


def test_eval_options_reach_its_own_parser(capsys):
    # eval parses its own options: a leading "-h" shows its usage, not a top-level error
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "-h"])
    assert e.value.code == 0 and "latentdiff eval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # other commands still refuse unknown options, by name
        cli.main(["generate", "x", "--bogus", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
