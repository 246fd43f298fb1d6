"""A1111 prompt tags for LoRAs: parsing as modules/extra_networks.py does, and name lookup in LoRA folders."""
import pytest
import torch
from safetensors.torch import save_file

from latentdiff.adapters.tags import LoraTag, find, parse


def test_parse_as_a1111():
    text, tags = parse("a <lora:foo:0.7>, cat <lora:bar:0.5:0.2> <lyco:baz> <lora:qux:te=0.3:unet=0.9>")
    assert text == "a , cat   "  # tags become "", the spaces and commas around them stay
    assert tags == [LoraTag("foo", 0.7, 0.7), LoraTag("bar", 0.5, 0.2), LoraTag("baz", 1.0, 1.0),
                    LoraTag("qux", 0.3, 0.9)]
    assert parse("no tags (here:1.2)") == ("no tags (here:1.2)", [])


@pytest.mark.parametrize("text, match", [
    ("<lora:foo:abc>", "'abc' is not a number"),
    ("<hypernet:foo:1>", "extra network 'hypernet' is not supported"),
    ("<lora:foo:1:2:3>", "expected <lora:NAME:WEIGHT>"),
    ("<lora:foo:dyn=4>", "expected <lora:NAME:WEIGHT>"),
])
def test_bad_tags_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        parse(text)


def test_find_by_stem_and_by_output_name(tmp_path):
    (tmp_path / "Lora" / "sub").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, tmp_path / "Lora" / "sub" / "foo.safetensors", {"ss_output_name": "fooAlias"})
    dirs = [tmp_path / "missing", tmp_path / "Lora"]
    assert find("foo", dirs) == tmp_path / "Lora" / "sub" / "foo.safetensors"
    assert find("fooAlias", dirs) == tmp_path / "Lora" / "sub" / "foo.safetensors"
    with pytest.raises(FileNotFoundError, match="LoRA 'nope' not found.*Lora"):
        find("nope", dirs)
