"""The task interface the training engine drives; images (UNet) and sequences (ChiroDiff) implement it.

The engine never looks inside a batch. Per step it calls::

    inputs, target, weight = task.noisy_batch(batch, generator)   # x_t, t (and conditioning), ε, loss weight
    pred = task.predict(model, inputs)                              # the denoiser's ε̂
    loss = task.mse(pred, target, weight)                           # masked mean squared error

so a distillation loss can run the teacher on the very same ``inputs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from surgeon.errors import SurgeonError


def to_device(batch, device):
    """A collated batch (tensor, or dict/list/tuple of them) moved to ``device``; other values as they are."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """A generator only draws on its own device; draws are moved to the data afterwards."""
    return generator.device if generator is not None else device


class Task:
    """Base class: subclasses implement the data, the noising, the forward call and sampling."""

    name: str = "task"
    # Clip the predicted x₀ to the data range [-1, 1] at every sampling step (diffusers' ``clip_sample``): the
    # standard for pixel-space DDPM/DDIM. DDIM then re-derives ε from the clipped x₀ (ADM's DDIM, diffusers'
    # ``use_clipped_model_output``): keeping the raw ε in the direction term leaves the trajectory inconsistent
    # with the clipped x₀ (a grey haze on the background of glyphs). ``clip_refused`` says why a task cannot take
    # it (None: it can).
    clip_sample: bool = False
    clip_refused: str | None = "this task declares no data range to clip its samples to"
    eta: float = 0.0  # DDIM's η (a recipe's diffusion.eta): 0 deterministic, 1 DDPM's posterior noise at every step

    def set_clip_sample(self, value: bool | None) -> None:
        """Turn x₀ clipping on or off for sampling; None keeps the task's default."""
        if value is None:
            return
        if value and self.clip_refused is not None:
            raise SurgeonError(
                f"clip_sample cannot be turned on for this model: {self.clip_refused}",
                "leave clip_sample unset (the task's default) or set it false",
            )
        self.clip_sample = bool(value)

    def sampling_scheduler(self, cls, **config):
        """A sampler (DDIMScheduler, DDPMScheduler) on the training noise schedule, clipping as the task says."""
        return cls.from_config(self.scheduler.config, clip_sample=self.clip_sample, clip_sample_range=1.0, **config)

    def dataset(self, split: str = "train") -> Dataset | None:
        """The examples of ``split``; None where the data has no such split (an image folder without validation)."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        return torch.utils.data.default_collate(items)

    def noisy_batch(
        self, batch: Any, generator: torch.Generator | None = None, t: torch.Tensor | None = None
    ) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Sample t ~ U{0..T-1} (or take the given ``t``, one per example) and ε ~ N(0, I); return (model inputs
        incl. x_t and t, ε, optional weight)."""
        raise NotImplementedError

    def padding(self, inputs: dict) -> torch.Tensor | None:
        """Which positions of the inputs are real, ``[B, L]`` bool (padded sequences), or None when all are."""
        return None

    def predict(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(
        self, x0: torch.Tensor, generator: torch.Generator | None, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDPM forward process: t ~ U{0..T-1} unless given, ε ~ N(0, I), x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; returns
        (x_t, t, ε)."""
        gdev = draw_device(generator, x0.device)
        T = self.scheduler.config.num_train_timesteps  # noqa: N806
        if t is None:
            t = torch.randint(0, T, (x0.shape[0],), generator=generator, device=gdev).to(x0.device)
        else:
            t = torch.as_tensor(t, dtype=torch.long).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
        return self.scheduler.add_noise(x0, eps, t), t, eps

    @staticmethod
    def mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error; with ``weight`` (e.g. a padding mask broadcastable to pred) only weighted entries count."""
        if pred.shape != target.shape:  # broadcasting would silently train on a wrong objective
            raise SurgeonError(
                f"the model's output has shape {list(pred.shape)}, but the noise it must predict has "
                f"shape {list(target.shape)}",
                "the denoiser must return ε̂ with the shape of its input x_t",
            )
        err = (pred.float() - target.float()) ** 2
        if weight is None:
            return err.mean()
        weight = weight.to(err.dtype).expand_as(err)
        return (err * weight).sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def sample(
        self, model: nn.Module, n: int, generator: torch.Generator | None = None, steps: int | None = None
    ) -> Any:
        """Generate ``n`` samples with the task's sampler, in whatever form :meth:`to_images` takes (a tensor of
        images, or a dict of padded sequences)."""
        raise NotImplementedError

    def to_images(self, samples: Any) -> torch.Tensor:
        """Samples → uint8 images ``[n, H, W, C]`` for grids and FID."""
        raise NotImplementedError


def ddpm_scheduler(
    timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2, beta_schedule: str = "linear"
):
    """The training noise schedule (diffusers DDPMScheduler, ε-prediction, no sample clipping)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        clip_sample=False,
    )


def apply_diffusion_settings(task: Task, diffusion) -> None:
    """Rebuild ``task.scheduler`` from a recipe's diffusion section and take its sampler settings (clip_sample,
    eta); unset betas and clip_sample keep the task's defaults."""
    cfg = task.scheduler.config
    task.scheduler = ddpm_scheduler(
        diffusion.timesteps,
        cfg.beta_start if diffusion.beta_start is None else diffusion.beta_start,
        cfg.beta_end if diffusion.beta_end is None else diffusion.beta_end,
        diffusion.beta_schedule,
    )
    task.set_clip_sample(diffusion.clip_sample)
    task.eta = float(diffusion.eta)


class EpsilonLoss:
    """The task's plain DDPM ε-loss as a training objective (the protocol is in surgeon.training.objectives)."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(
        self, model: nn.Module, inputs: dict, target: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        return self.task.mse(self.task.predict(model, inputs), target, weight)

    def to(self, device) -> EpsilonLoss:
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        pass

    def begin_stage(self, stage: int, model: nn.Module, out_dir: Path, accelerator) -> None:
        pass
