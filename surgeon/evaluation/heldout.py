"""Held-out denoising loss: the validation split with fixed noise, comparable across runs and recipes."""

from __future__ import annotations

import torch
from torch import nn

from surgeon.data.sampler import BatchSampler
from surgeon.seeding import derive_seed, generator
from surgeon.tasks.base import Task


@torch.no_grad()
def heldout_loss(model: nn.Module, task: Task, objective, batch_size: int, batches: int, seed: int) -> float | None:
    """Denoising loss on the validation split with fixed noise: comparable across runs and recipes."""
    data = task.dataset("val")
    if data is None or len(data) == 0:
        return None
    was_training = model.training
    model.eval()
    sampler = BatchSampler(len(data), min(batch_size, len(data)), seed=derive_seed(seed, 7))
    losses = []
    for b in range(batches):
        batch = task.collate([data[i] for i in sampler.indices(b)])
        gen = generator(seed, 99, b)
        inputs, target, weight = task.noisy_batch(batch, gen)
        losses.append(float(objective(model, inputs, target, weight)))
    model.train(was_training)
    return sum(losses) / len(losses)
