"""Shared helpers for the training tests: a synthetic image task (no KanjiVG, no files) and small recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgeon.masking.surgery import sites
from surgeon.models import presets
from surgeon.recipe import DYNAMIC, Recipe, load_recipe
from surgeon.tasks.images import ImageTask
from surgeon.training.loop import train
from surgeon.training.run import prepare


class _Images(torch.utils.data.Dataset):
    """Plain tensors (no labels), as ImageFolder yields them."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class SyntheticImageTask(ImageTask):
    """ImageTask over seeded random images in [-1, 1]: ``n`` training and ``n_val`` validation examples."""

    def __init__(self, model, n: int = 32, n_val: int = 8, seed: int = 0):
        super().__init__(model, data="synthetic")
        g = torch.Generator().manual_seed(seed)
        shape = (self.image_channels, self.image_size, self.image_size)
        # smooth blobs rather than white noise, so the denoiser has something to learn
        base = torch.rand((n + n_val, *shape), generator=g) * 2 - 1
        base = torch.nn.functional.avg_pool2d(base, 3, stride=1, padding=1).clamp(-1, 1)
        self._datasets = {"train": _Images(base[:n]), "validation": _Images(base[n:]), "val": _Images(base[n:])}

    def dataset(self, split: str = "train"):
        return self._datasets[split]


def small_recipe(name: str = "rigl", **changes) -> Recipe:
    """A shipped recipe shrunk for tests: few steps, tiny batches, no checkpoints unless asked."""
    base = {
        "training.steps": 12,
        "training.batch_size": 4,
        "training.checkpoint_every": 10_000,
        "training.log_every": 1,
        "training.eval_batches": 1,
        "training.num_samples": 4,
        "diffusion.sample_steps": 2,
        "optimizer.lr": 1e-3,
        "dst.delta_t": 3,
        "dst.p": 0.3,
        "dst.p_decay": "constant",
        "dst.stop_fraction": 1.0,
    }
    recipe = load_recipe(name)
    if recipe.algorithm not in DYNAMIC:  # only RigL and MagRan read dst:; the schema rejects it elsewhere
        base = {k: v for k, v in base.items() if not k.startswith("dst.")}
    base.update(changes)
    return recipe.override(**base)


def tiny_model(recipe: Recipe, seed: int = 0):
    """presets tiny-unet (45K parameters), re-initialized and injected as ``recipe`` says."""
    model = presets.build("tiny-unet", seed=seed)
    return prepare(model, recipe)


CHECKPOINTED = {
    "training.steps": 8,
    "training.log_every": 3,
    "training.checkpoint_every": 4,
    "training.keep_checkpoints": 0,
}


def train_checkpointed(out, resume=None, stop_after=None, **changes):
    """RigL on tiny-unet and synthetic images: 8 steps, logged every 3, a checkpoint every 4, all kept."""
    recipe = small_recipe("rigl", **{**CHECKPOINTED, **changes})
    model = tiny_model(recipe)
    return train(model, SyntheticImageTask(model), recipe, out, resume=resume, progress=False, stop_after=stop_after)


def masks_of(model) -> dict[str, torch.Tensor]:
    return {f: s.mask.detach().clone() for f, s in sites(model).items()}


def state_of(model) -> dict[str, torch.Tensor]:
    """Every state tensor (originals and mask buffers), detached clones on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_state(model, path: Path) -> None:
    """Masks (as uint8) and the full state dict to one safetensors file, for comparison across processes."""
    tensors = {f"state.{k}": v.contiguous() for k, v in state_of(model).items()}
    tensors.update({f"mask.{k}": v.to(torch.uint8).contiguous() for k, v in masks_of(model).items()})
    save_file(tensors, str(path))


REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the machine is small and shared, and bit-identical comparisons between processes
    need the same reduction order everywhere (subprocesses get OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO / "tests") + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
