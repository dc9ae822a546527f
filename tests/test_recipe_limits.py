"""Recipe and plan values out of range are refused by name: non-finite power scales, learning rates, betas, schedules."""

from __future__ import annotations

import pytest
from helpers_train import one_thread  # noqa: F401

import surgeon
from surgeon import SurgeonError
from surgeon.recipe import Recipe, load_recipe


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_plan_rejects_a_power_scale_that_is_not_finite_and_non_negative(value):
    # NaN used to make the ERK solve loop forever
    model = surgeon.load_model("tiny-unet")
    with pytest.raises(SurgeonError, match="power_scale"):
        surgeon.plan(model, sparsity=0.5, power_scale=value)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_recipe_power_scale_nan_or_inf_is_rejected_naming_the_key(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(f"algorithm: rigl\nsparsity: 0.5\npower_scale: {text}\n")
    with pytest.raises(SurgeonError, match="'power_scale' must be a finite number"):
        load_recipe(path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("optimizer.lr", float("nan"), "'optimizer.lr' must be a finite number"),
        ("optimizer.lr", float("inf"), "'optimizer.lr' must be a finite number"),
        ("optimizer.weight_decay", -0.1, "weight_decay must be ≥ 0"),
        ("optimizer.betas", [0.9, 1.0], "betas"),
        ("optimizer.betas", [-0.1, 0.99], "betas"),
        ("optimizer.eps", 0.0, "eps must be > 0"),
        ("diffusion.timesteps", 0, "diffusion.timesteps must be ≥ 1"),
        ("diffusion.beta_schedule", "cubic", "unknown beta_schedule 'cubic'"),
        ("diffusion.beta_start", 0.0, "diffusion.beta_start must be in (0, 1)"),
        ("diffusion.beta_end", 1.5, "diffusion.beta_end must be in (0, 1)"),
        ("diffusion.sample_steps", 2000, "sample_steps must be in [1, timesteps=1000]"),
        ("diffusion.eta", -0.5, "diffusion.eta must be in [0, 1]"),
        ("diffusion.eta", 1.5, "diffusion.eta must be in [0, 1]"),
        ("training.seed", 2**64, "seed"),
        ("training.seed", -1, "seed"),
        ("training.eval_batches", 0, "eval_batches must be ≥ 1"),
        ("training.num_samples", -1, "num_samples must be ≥ 0"),
        ("lambda_w", -1.0, "lambda_w"),
        ("power_scale", -0.5, "power_scale"),
        ("distill.lambda_1", -1.0, "distill weights"),
    ],
)
def test_recipe_values_out_of_range_get_their_own_message(key, value, words):
    with pytest.raises(SurgeonError) as info:
        load_recipe("rigl").override(**{key: value})
    assert words in info.value.message
    assert info.value.hint and "SURGEON_DEBUG" not in info.value.hint


def test_beta_start_above_beta_end_is_refused():
    with pytest.raises(SurgeonError, match="above beta_end"):
        Recipe.from_dict({"diffusion": {"beta_start": 0.02, "beta_end": 0.001}})
