"""The hook points the training loop calls, in order, every step::

algorithm.stage_starting_at(step)     progressive N:M: the stage this step begins (a switch), or None;
                                      on a switch the loop logs algorithm.stage_event(stage) and lets the
                                      objective take its teacher (objective.begin_stage)
algorithm.begin_step(step)            before the forward passes of this step
(forward / backward over micro-batches)
algorithm.after_backward(step)        gradients are complete (and synchronized across processes)
if not algorithm.skip_optimizer_step(step): optimizer.step()
algorithm.after_optimizer_step(step)  masks may change here; returns {fqn: changed positions} for EMA/optimizer fix-ups
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.recipe import Recipe


class Algorithm:
    name = "base"
    mask_init = "random"  # how inject() draws the initial mask: "random" (from scratch) or "magnitude"
    changes_masks = False

    def __init__(self, recipe: Recipe, total_steps: int):
        self.recipe = recipe
        self.total_steps = total_steps

    def setup(self, model: nn.Module, accelerator) -> None:
        self.model = model
        self.accelerator = accelerator

    def stage_starting_at(self, step: int) -> int | None:
        return None

    def stage_event(self, stage: int) -> dict:
        return {"stage": stage + 1}

    def begin_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def skip_optimizer_step(self, step: int) -> bool:
        return False

    def after_optimizer_step(self, step: int) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
