"""Training with accelerate: `accelerate launch train.py --config configs/train/<name>.yaml [--key=value ...]`."""
from __future__ import annotations

import sys

from .config import TrainConfig, load_train_config


def main(argv: list[str] | None = None) -> dict:
    """Parse `--config FILE` plus `--key=value` overrides, then train."""
    from .loop import train

    args = list(sys.argv[1:] if argv is None else argv)
    path = None
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            path = args.pop(i + 1)
            args.pop(i)
            break
        if a.startswith("--config="):
            path = args.pop(i).split("=", 1)[1]
            break
    return train(load_train_config(path, args))


__all__ = ["TrainConfig", "load_train_config", "main"]
