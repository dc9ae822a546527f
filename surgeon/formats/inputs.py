"""One denoising step of a model with its own input shapes: what the CSR export measures and the benchmarks time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from surgeon.seeding import generator
from surgeon.tasks import is_image_model, is_sequence_model


def denoising_step(
    model: nn.Module, batch: int = 4, length: int = 64, seed: int = 0
) -> Callable[[nn.Module], Any] | None:
    """``step(m)`` runs one seeded denoiser call on ``batch`` inputs shaped as ``model`` takes them, or None when
    surgeon cannot tell (a module that is neither a diffusers 2D denoiser nor a ``forward(x_t, t, mask)`` model).

    Image models get latents of their ``sample_size`` and ``in_channels`` plus their conditioning (an empty
    prompt, class 0); sequence models ``length`` points of their ``features``, all real (no padding).
    """
    g = generator(seed)
    t = torch.randint(0, 1000, (batch,), generator=g)
    if is_sequence_model(model):
        features = int(dict(getattr(model, "config", None) or {}).get("features", 3))
        x = torch.randn(batch, length, features, generator=g)
        mask = torch.ones(batch, length, dtype=torch.bool)
        return lambda m: m(x.to(_dtype(m)), t, mask)
    if is_image_model(model):
        from surgeon.tasks.images import ImageTask

        task = ImageTask(model, data="")
        x = torch.randn(batch, task.latent_channels, task.latent_size, task.latent_size, generator=g)
        labels = torch.zeros(batch, dtype=torch.long) if task.class_conditional else None
        cond = task.conditioning(batch, "cpu", labels)
        return lambda m: task.predict(
            m,
            {
                "x_t": x.to(_dtype(m)),
                "t": t,
                **{k: v.to(_dtype(m)) if v.is_floating_point() else v for k, v in cond.items()},
            },
        )
    return None


def _dtype(m: nn.Module) -> torch.dtype:
    p = next(m.parameters(), None)
    if p is None:  # every weight became a CSR buffer: take a floating buffer's dtype
        p = next((b for b in m.buffers() if b.is_floating_point()), torch.empty(0))
    return p.dtype
