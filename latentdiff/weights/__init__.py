"""Checkpoint files, read and written: single files in the original key layout, diffusers folders, preview
decoders. `models/` knows nothing of files; everything that maps a file's keys onto the modules lives here.

    io.py           safetensors / .ckpt reading (validated, memory-mapped), atomic writing, background reads
    layout.py       single-file prefixes, ignored keys, the modules a config builds, key checks, detection
    single_file.py  single files -> (config, modules) and back
    folder.py       diffusers folders -> (config, modules) and back
    diffusers/      the key rename tables between the original layout and diffusers'
    preview.py      preview / TAESD decoder files
"""
from .io import CheckpointError, SafetensorsFile, read_ckpt, read_in_background, write_safetensors
from .layout import (CONFIG_KEY, build_modules, check_keys, detect, expected_shapes, is_ignored, parts,
                     resolve_prediction_type, state_dict_of)
from .single_file import read_single_file, save_single_file

__all__ = ["CONFIG_KEY", "CheckpointError", "SafetensorsFile", "build_modules", "check_keys", "detect",
           "expected_shapes", "is_ignored", "parts", "read_ckpt", "read_in_background", "read_single_file",
           "resolve_prediction_type", "save_single_file", "state_dict_of", "write_safetensors"]
