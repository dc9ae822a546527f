"""Runs trained side by side in worker processes give the results of the same runs trained one after the other."""

from __future__ import annotations

import pytest
from helpers import write_images
from helpers_train import one_thread, small_recipe  # noqa: F401

from surgeon.errors import SurgeonError
from surgeon.study.side_by_side import last_step, train_side_by_side, workers_for
from surgeon.training.run import sparsify


def test_workers_share_out_the_cores():
    assert workers_for(2, cpus=2) == (2, 1)
    assert workers_for(2, cpus=16) == (2, 8)
    assert workers_for(3, cpus=2) == (2, 1)
    assert workers_for(1, cpus=1) == (1, 1)
    assert workers_for(2, cpus=3) == (2, 1)


def test_last_step_skips_a_line_being_written(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert last_step(metrics) == 0  # not written yet
    metrics.write_text('{"step": 3, "loss": 0.5}\n{"step": 6, "lo')
    assert last_step(metrics) == 3


def _jobs(tmp_path, root: str) -> list[dict]:
    data = write_images(tmp_path / "data", n=8)
    return [
        dict(
            model="tiny-unet",
            recipe=small_recipe(name, **{"training.steps": 3}),
            data=str(data),
            out=tmp_path / root / name,
            samples=False,
        )
        for name in ("dense", "static")
    ]


def test_side_by_side_equals_one_after_the_other(tmp_path):
    parallel = train_side_by_side(_jobs(tmp_path, "parallel"), [3, 3], progress=False, threads=1)
    serial = [sparsify(**job, progress=False) for job in _jobs(tmp_path, "serial")]
    assert [s.recipe for s in parallel] == [s.recipe for s in serial] == ["dense", "static"]  # in the jobs' order
    assert [s.final_loss for s in parallel] == [s.final_loss for s in serial]  # bit-identical at one thread
    assert [s.params_kept for s in parallel] == [s.params_kept for s in serial]
    assert parallel[1].params_kept < parallel[0].params_kept
    assert last_step(tmp_path / "parallel" / "static" / "metrics.jsonl") == 3


def test_a_failing_run_raises_its_own_error_in_the_parent(tmp_path):
    jobs = _jobs(tmp_path, "runs")
    jobs[1]["data"] = str(tmp_path / "no-such-folder")
    with pytest.raises(SurgeonError) as err:
        train_side_by_side(jobs, [3, 3], progress=False, threads=1)
    assert "no-such-folder" in str(err.value) and err.value.hint  # the worker's message and hint survive
