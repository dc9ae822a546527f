"""What is being denoised. A Task turns data batches into (model inputs, target, weight) and samples.

``make_task`` picks the task from the model: diffusers 2D denoisers get images, sequence models (ChiroDiff and any
module with ChiroDiff's ``forward(x_t, t, mask)`` signature) get stroke sequences.
"""

from __future__ import annotations

import inspect

from torch import nn

from surgeon.errors import SurgeonError
from surgeon.tasks.base import Task, apply_diffusion_settings, ddpm_scheduler

SEQUENCE_FORWARD = ("x_t", "t", "mask")


def is_sequence_model(model: nn.Module) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[:3] == list(SEQUENCE_FORWARD)


def is_image_model(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and "sample_size" in dict(cfg) and "in_channels" in dict(cfg)


def make_task(model: nn.Module, data: str, vae: nn.Module | None = None, limit: int | None = None) -> Task:
    if is_sequence_model(model):
        from surgeon.tasks.sequences import SequenceTask

        return SequenceTask(data=data, limit=limit)
    if is_image_model(model):
        from surgeon.tasks.images import ImageTask

        return ImageTask(model, data=data, vae=vae, limit=limit)
    raise SurgeonError(
        f"cannot tell what {type(model).__name__} denoises",
        "use a diffusers 2D model (config with sample_size and in_channels) or a sequence model with forward(x_t, t, mask)",
    )


__all__ = ["Task", "apply_diffusion_settings", "ddpm_scheduler", "is_image_model", "is_sequence_model", "make_task"]
