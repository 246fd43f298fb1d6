"""Exponential moving average of the trained weights.

Every rank updates its own fp32 copy from the same (all-reduced, hence identical) weights after every optimizer
step, so the averages stay identical across ranks without communication."""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    def decay_at(self, step: int) -> float:
        # warm-up (as ldm's LitEma): early averages forget the random init quickly
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, named_params: dict[str, nn.Parameter], step: int) -> None:
        d = self.decay_at(step)
        for n, p in named_params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - d)  # s = d * s + (1 - d) * p

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, nn.Parameter]) -> None:
        for n, p in named_params.items():
            p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if set(sd) != set(self.shadow):
            raise ValueError(f"EMA state does not match the trained parameters: "
                             f"missing {sorted(set(self.shadow) - set(sd))[:5]}, "
                             f"unexpected {sorted(set(sd) - set(self.shadow))[:5]}")
        for n, t in sd.items():
            self.shadow[n].copy_(t)
