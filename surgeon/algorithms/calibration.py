"""Calibration inputs for one-shot pruning: N examples noised at chosen timesteps, made once and reused by every pass.

Timestep schemes (T = the task's number of diffusion steps; one timestep per example):

uniform       t ~ U{0..T-1}
K-stratified  [0, T) cut into K equal strata; example i falls in stratum i mod K, t uniform within it
weighted      t as ``uniform``, and each example's statistics weighted by w(t) = ln(2 + t) / ln(1 + T), which grows
              with the noise level: the first denoising steps (large t), whose errors every later step inherits,
              weigh most, after OBS-Diff's logarithmic weighting over the denoising order (Zhu et al., 2025)

Padded sequence positions (the task's :meth:`~surgeon.tasks.base.Task.padding`) travel with each batch, so the
statistics never see them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgeon import seeding
from surgeon.errors import SurgeonError, check_arg
from surgeon.tasks.base import Task, to_device

TIMESTEP_HINT = "use uniform, weighted or K-stratified (e.g. 8-stratified)"
_STRATIFIED = re.compile(r"^(\d+)-stratified$")


def parse_timesteps(scheme: str) -> tuple[str, int]:
    """ "uniform" → ("uniform", 1); "8-stratified" → ("stratified", 8); "weighted" → ("weighted", 1)."""
    if scheme in ("uniform", "weighted"):
        return scheme, 1
    match = _STRATIFIED.match(str(scheme))
    if match is None or int(match.group(1)) < 1:
        raise SurgeonError(f"unknown timestep scheme {scheme!r}", TIMESTEP_HINT)
    return "stratified", int(match.group(1))


def draw_timesteps(n: int, num_timesteps: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps in [0, T) by ``scheme`` (long ``[n]``)."""
    kind, k = parse_timesteps(scheme)
    if kind != "stratified":
        return torch.randint(0, num_timesteps, (n,), generator=generator)
    if k > num_timesteps:
        raise SurgeonError(f"{k} strata for {num_timesteps} timesteps", f"use at most {num_timesteps}-stratified")
    edges = torch.linspace(0, num_timesteps, k + 1).round().long()
    stratum = torch.arange(n) % k
    low, width = edges[stratum], edges[stratum + 1] - edges[stratum]
    return low + (torch.rand(n, generator=generator) * width).long().clamp_max(width - 1)


def timestep_weights(t: torch.Tensor, num_timesteps: int, scheme: str) -> torch.Tensor | None:
    """Per-example weight of the statistics: None (all equal) unless ``scheme`` is weighted."""
    if parse_timesteps(scheme)[0] != "weighted":
        return None
    return torch.log(t.double() + 2.0) / math.log(num_timesteps + 1.0)


@dataclass
class Calibration:
    """Model inputs for the calibration passes: ``batches`` of keyword inputs, fed to the model by ``predict``.

    ``padding[i]`` marks the real positions of batch i (``[B, L]`` bool, or None), ``weights[i]`` weighs its
    examples (``[B]``, or None). ``info`` is recorded in the pruned model's metadata.
    """

    batches: list[dict]
    predict: Callable[[nn.Module, dict], Any]
    padding: list[torch.Tensor | None] = field(default_factory=list)
    weights: list[torch.Tensor | None] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.batches:
            raise SurgeonError("no calibration batches", "give at least one batch of model inputs")
        self.padding = list(self.padding) or [None] * len(self.batches)
        self.weights = list(self.weights) or [None] * len(self.batches)
        if not len(self.padding) == len(self.weights) == len(self.batches):
            raise SurgeonError("padding and weights must have one entry per calibration batch", "check their lengths")

    def to(self, device) -> Calibration:
        return Calibration(
            [to_device(b, device) for b in self.batches],
            self.predict,
            [None if p is None else p.to(device) for p in self.padding],
            [None if w is None else w.to(device) for w in self.weights],
            dict(self.info),
        )

    @classmethod
    def from_batches(cls, batches: Iterable[dict], padding_key: str | None = None) -> Calibration:
        """Calibration from your own batches of keyword inputs (a custom pipeline): the model is called as
        ``model(**batch)``; ``padding_key`` names the ``[B, L]`` bool input that marks real sequence positions."""
        batches = list(batches)
        for b in batches:
            check_arg(b, dict, "each calibration batch", "a dict of keyword inputs for the model")
        padding = [b[padding_key].bool() for b in batches] if padding_key else []
        return cls(batches, lambda model, inputs: model(**inputs), padding, info={"source": "batches"})


def check_calib(n: int) -> int:
    check_arg(n, int, "calib", "an integer")
    if n < 1:
        raise SurgeonError(f"--calib must be ≥ 1, got {n}", "calibrate on some examples, e.g. --calib 128")
    return n


def from_task(task: Task, n: int, timesteps: str = "uniform", seed: int = 0, batch_size: int = 16) -> Calibration:
    """``n`` training examples of ``task`` (a seeded draw), each noised at one timestep of the scheme through the
    task's own noise schedule and conditioning."""
    check_calib(n)
    check_arg(batch_size, int, "batch_size", "an integer")
    if batch_size < 1:
        raise SurgeonError(f"calibration batch size must be ≥ 1, got {batch_size}", "e.g. 16")
    parse_timesteps(timesteps)
    data = task.dataset("train")
    if data is None or len(data) == 0:
        raise SurgeonError("no training examples to calibrate on", "check --data")
    gen = seeding.generator(seed)
    order = torch.randperm(len(data), generator=gen)[: min(n, len(data))].tolist()
    T = task.scheduler.config.num_train_timesteps  # noqa: N806
    t_all = draw_timesteps(len(order), T, timesteps, gen)
    batches, padding, weights = [], [], []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        t = t_all[start : start + len(idx)]
        inputs, _, _ = task.noisy_batch(task.collate([data[i] for i in idx]), gen, t=t)
        batches.append(inputs)
        padding.append(task.padding(inputs))
        weights.append(timestep_weights(t, T, timesteps))
    info = {"examples": len(order), "timesteps": timesteps, "seed": int(seed), "num_train_timesteps": int(T)}
    return Calibration(batches, task.predict, padding, weights, info)
