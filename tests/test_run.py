"""The shared run pipeline: library calls never reseed the caller's global RNG, custom pipelines pass their own
modules and data, and a recipe whose distill section the run cannot honour is refused, not ignored."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_train import SyntheticImageTask, one_thread, small_recipe  # noqa: F401

from surgeon.errors import SurgeonError
from surgeon.models import presets
from surgeon.training.loop import train
from surgeon.training.run import prepare, reinitialize, sparsify


def _untouched(call) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    call()
    assert torch.equal(torch.rand(3), expected), "the call changed the global torch RNG"


def test_library_calls_leave_the_global_rng_alone(tmp_path):
    recipe = small_recipe("static", **{"training.steps": 2})
    _untouched(lambda: presets.build("tiny-unet", seed=3))
    model = presets.build("tiny-unet")
    _untouched(lambda: reinitialize(model, seed=5))
    _untouched(lambda: prepare(model, recipe))
    _untouched(lambda: train(model, SyntheticImageTask(model), recipe, tmp_path / "run", progress=False))


def test_seeded_builds_depend_on_the_seed_only():
    torch.manual_seed(0)
    a = presets.build("tiny-unet", seed=3).state_dict()
    torch.manual_seed(99)  # a different caller state changes nothing
    b = presets.build("tiny-unet", seed=3).state_dict()
    c = presets.build("tiny-unet", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_sparsify_takes_a_module_and_a_task_built_by_the_caller(tmp_path):
    model = presets.build("tiny-unet")
    recipe = small_recipe("static", **{"training.steps": 3})
    summary = sparsify(model, recipe, SyntheticImageTask(model), tmp_path / "run", progress=False, samples=False)
    assert summary.steps == 3 and summary.pipeline is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_distill_recipe_without_a_teacher_is_refused_before_anything_is_written(tmp_path):
    model = presets.build("tiny-unet")
    recipe = small_recipe("static").override(**{"distill.lambda_1": 0.5})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeonError, match="distill section, but this run has no teacher"):
        sparsify(model, recipe, SyntheticImageTask(model), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not even re-initialized
