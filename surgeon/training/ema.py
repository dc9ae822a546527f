"""Exponential moving average of the trainable tensors that follows the masks (docs/methods.md, "Invariants").

Each average is laid out as its parameter is: under FSDP2 every rank averages its own shard."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.masking.shards import like
from surgeon.masking.zeroing import zero_at_


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def reset(self, positions: dict[str, torch.Tensor]) -> None:
        """Zero the average where a mask update dropped or grew a weight ({parameter name: bool positions})."""
        for n, pos in positions.items():
            zero_at_(self.shadow[n], pos)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """``state`` holds whole tensors (a checkpoint's); a sharded average takes its own part."""
        for n, shadow in self.shadow.items():
            shadow.copy_(like(state[n].to(shadow.dtype), shadow))
