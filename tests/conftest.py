"""Shared fixtures: tiny seeded models and deterministic inputs. No network, CPU only."""

from __future__ import annotations

import pytest
import torch

from surgeon.models import presets

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting makes
# every forward 10-50x slower under load. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


def preset_inputs(name: str, batch: int = 2, seed: int = 0) -> tuple[tuple, dict]:
    """Seeded (args, kwargs) for one forward of a tiny preset."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([3, 10][:batch] + [7] * max(0, batch - 2))
    if name == "tiny-unet":
        return (torch.randn(batch, 1, 16, 16, generator=g), t), {}
    if name == "tiny-unet-cond":
        return (torch.randn(batch, 4, 16, 16, generator=g), t), {
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g)
        }
    if name == "tiny-unet1d":
        return (torch.randn(batch, 4, 16, generator=g), t), {}
    if name == "tiny-dit":
        return (torch.randn(batch, 4, 8, 8, generator=g),), {
            "timestep": t,
            "class_labels": torch.arange(batch) % 10,
        }
    raise KeyError(name)


def _cast(x, dtype):
    return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x


@pytest.fixture
def run_preset():
    """``run_preset(name, model, dtype=None)`` → output tensor of one seeded forward (eval mode, no grad)."""

    def run(name: str, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        args, kwargs = preset_inputs(name)
        if dtype is not None:
            args = tuple(_cast(a, dtype) for a in args)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        model.eval()
        with torch.no_grad():
            return model(*args, **kwargs).sample

    return run


@pytest.fixture
def build_preset():
    """``build_preset(name, seed=0)`` → a freshly initialized tiny diffusers model."""
    return presets.build
