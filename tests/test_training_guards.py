"""The training loop's guards: resumes are exact and refuse mismatches (torn or damaged log lines, another
algorithm, fewer steps), and a run that diverges stops naming the step."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_error, invoke, write_images
from helpers_train import (
    CHECKPOINTED,
    SyntheticImageTask,
    one_thread,  # noqa: F401
    small_recipe,
    tiny_model,
    train_checkpointed,
)

from surgeon import SurgeonError
from surgeon.training import checkpoint as ckpt
from surgeon.training.loop import train

# ---- resume: partial log line, unlogged losses, refusals; divergence ----------------------------------------------


def _records(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def test_resume_off_a_log_step_after_a_torn_log_line_logs_bit_identical(tmp_path):
    # the checkpoint at step 4 falls between log steps 3 and 6: step 4's loss is in no log line yet
    train_checkpointed(tmp_path / "cut", stop_after=5)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.12')  # what a kill mid-write leaves
    train_checkpointed(tmp_path / "cut", resume=tmp_path / "cut" / "checkpoints" / "step-0000004.safetensors")
    train_checkpointed(tmp_path / "full")
    assert _records(tmp_path / "cut" / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")


def test_resume_refuses_a_damaged_log_line_in_the_middle(tmp_path):
    train_checkpointed(tmp_path / "run", stop_after=5)
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(SurgeonError, match="line 1 is not JSON"):
        train_checkpointed(tmp_path / "run", resume=tmp_path / "run")


def test_resume_refuses_another_algorithms_checkpoint(tmp_path):
    train_checkpointed(tmp_path / "run", stop_after=4)  # rigl
    with pytest.raises(SurgeonError, match="made by algorithm 'rigl', not 'magran'") as info:
        recipe = small_recipe("magran", **CHECKPOINTED)
        model = tiny_model(recipe)
        train(model, SyntheticImageTask(model), recipe, tmp_path / "run", resume=tmp_path / "run", progress=False)
    assert "algorithm: rigl" in info.value.hint


def test_resume_refuses_steps_below_the_checkpoint(tmp_path):
    train_checkpointed(tmp_path / "run", stop_after=4)
    with pytest.raises(SurgeonError, match="at step 4, past the run's 3 steps") as info:
        train_checkpointed(
            tmp_path / "run", resume=tmp_path / "run", **{"training.steps": 3, "training.checkpoint_every": 2}
        )
    assert "--steps 4" in info.value.hint


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = small_recipe(
        "static",
        **{
            "training.steps": 12,
            "training.log_every": 2,
            "training.checkpoint_every": 3,
            "training.keep_checkpoints": 0,
        },
    )
    model = tiny_model(recipe)

    class Poisoned(SyntheticImageTask):
        calls = 0

        def noisy_batch(self, batch, generator=None):
            inputs, target, weight = super().noisy_batch(batch, generator)
            Poisoned.calls += 1
            if Poisoned.calls == 5:  # step 5: the loss is NaN
                target = target * float("nan")
            return inputs, target, weight

    with pytest.raises(SurgeonError, match="the loss is not finite at step 5") as info:
        train(model, Poisoned(model), recipe, tmp_path / "run", progress=False)
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-0000003.safetensors"]  # step 6 was not saved: it came after the NaN
    assert str(found[0]) in info.value.hint


def test_cli_lr_inf_is_refused_and_a_huge_lr_stops_with_an_error_not_a_nan_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = tmp_path / "images"
    write_images(images)
    base = [
        "sparsify",
        "tiny-unet",
        "--recipe",
        "static",
        "--data",
        str(images),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--no-progress",
        "--no-samples",
    ]
    assert_one_error(invoke(*base, "--lr", "inf", "--out", tmp_path / "a"), "'optimizer.lr' must be a finite number")
    assert not (tmp_path / "a").exists()
    assert_one_error(invoke(*base, "--lr", "1e30", "--out", tmp_path / "b"), "training diverged")
    assert not (tmp_path / "b" / "model").exists()
