"""Resuming: a run killed with SIGKILL (or stopped with Ctrl-C) and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error, write_images
from helpers_train import (  # noqa: F401
    REPO,
    SyntheticImageTask,
    masks_of,
    one_thread,
    small_recipe,
    state_of,
    subprocess_env,
    tiny_model,
)
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.training import checkpoint as ckpt
from surgeon.training.loop import train

SURGEON = REPO / ".venv" / "bin" / "surgeon"

RECIPE = {
    "training.steps": 16,
    "dst.delta_t": 3,
    "training.checkpoint_every": 4,
    "training.keep_checkpoints": 2,
    "training.ema_decay": 0.9,
}

SCRIPT = """
import sys, time
import torch
from helpers_train import SyntheticImageTask, small_recipe, tiny_model
from surgeon.training.loop import train

class SlowTask(SyntheticImageTask):
    # same data and noise as SyntheticImageTask; each step just takes longer, so the kill lands mid-run
    def collate(self, items):
        time.sleep(0.2)
        return super().collate(items)

recipe = small_recipe("rigl", **{recipe!r})
model = tiny_model(recipe)
print("training", flush=True)
train(model, SlowTask(model), recipe, sys.argv[1], progress=False)
print("finished", flush=True)
"""


def _records(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock times."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def _kill_after_first_checkpoint(tmp_path: Path, script_text: str) -> Path:
    """Run ``script_text`` (it trains into argv[1]) in a subprocess and SIGKILL it once a checkpoint exists."""
    script = tmp_path / "train_script.py"
    script.write_text(script_text)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed)],
        env=subprocess_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: bool(ckpt.list_checkpoints(killed / "checkpoints")), proc)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return killed


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    killed = _kill_after_first_checkpoint(tmp_path, SCRIPT.format(recipe=RECIPE))
    last = ckpt.list_checkpoints(killed / "checkpoints")[-1]
    stopped_at = int(re.search(r"step-(\d+)", last.name).group(1))
    assert 4 <= stopped_at < 16  # killed mid-way
    logged = _records(killed / "metrics.jsonl")
    assert logged[-1]["step"] < 16

    recipe = small_recipe("rigl", **RECIPE)
    resumed = tiny_model(recipe)
    result = train(resumed, SyntheticImageTask(resumed), recipe, killed, resume=killed, progress=False)
    assert result.steps == 16

    reference = tiny_model(recipe)
    full = train(reference, SyntheticImageTask(reference), recipe, tmp_path / "reference", progress=False)
    assert [u["step"] for u in full.mask_updates] == [3, 6, 9, 12, 15]
    # masks moved during the run, before and after the kill
    start = masks_of(tiny_model(recipe))
    assert any(not torch.equal(start[f], m) for f, m in masks_of(reference).items())
    _assert_identical(state_of(resumed), state_of(reference))  # weights (EMA-averaged), mask buffers
    assert result.mask_updates == full.mask_updates  # the algorithm's history survives the checkpoint
    # the log reads like one uninterrupted run: lines past the checkpoint were dropped, losses are bit-equal
    assert _records(killed / "metrics.jsonl") == _records(tmp_path / "reference" / "metrics.jsonl")


CLI_RECIPE = """\
algorithm: rigl
sparsity: 0.5
dst: {delta_t: 3, p: 0.3, p_decay: constant, stop_fraction: 1.0}
optimizer: {lr: 1.0e-3}
training: {steps: 40, batch_size: 4, log_every: 1, checkpoint_every: 1000, eval_batches: 1}
"""


def test_ctrl_c_exits_130_names_the_checkpoint_and_resumes_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = tmp_path / "images"
    write_images(images)
    recipe = tmp_path / "small-rigl.yaml"
    recipe.write_text(CLI_RECIPE)
    run = tmp_path / "run"
    args = ["sparsify", "tiny-unet", "--recipe", str(recipe), "--data", str(images), "--no-progress", "--no-samples"]
    proc = subprocess.Popen(
        [str(SURGEON), *args, "--out", str(run)],
        env=subprocess_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    error, _ = assert_one_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "interrupted", hint=["--resume"], code=130
    )
    m = re.fullmatch(r"error: interrupted after step (\d+); checkpoint saved to (\S+)", error)
    assert m, error
    step, path = int(m.group(1)), Path(m.group(2))
    assert 2 <= step < 40 and path.is_file() and path.parent == run / "checkpoints"
    assert not (run / "model").exists()  # nothing final was written

    runner = CliRunner()
    resumed = runner.invoke(app, [*args, "--out", str(run), "--resume", str(path)])
    assert resumed.exit_code == 0, resumed.output
    full = runner.invoke(app, [*args, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output

    a, b = surgeon.load(run / "model"), surgeon.load(tmp_path / "full" / "model")
    _assert_identical(a.state_dict(), b.state_dict())
    sa, sb = surgeon.masking.surgery.sites(a), surgeon.masking.surgery.sites(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[f].mask, sb[f].mask) for f in sa)
    assert _records(run / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")
    assert json.loads((run / "summary.json").read_text())["steps"] == 40


FT_RECIPE = {
    "training.steps": 12,
    "stages": [{"nm": "3:4", "steps": 3}, {"nm": "2:4", "steps": 9}],
    "distill.teacher": "previous",
    "training.checkpoint_every": 4,
    "training.keep_checkpoints": 2,
    "training.ema_decay": 0.9,
    "training.batch_size": 4,
    "training.log_every": 1,
    "training.eval_batches": 1,
    "optimizer.lr": 1e-3,
}

FT_SCRIPT = """
import sys, time
from helpers_train import SyntheticImageTask
from surgeon.models import presets
from surgeon.recipe import load_recipe
from surgeon.training.run import finetune

class SlowTask(SyntheticImageTask):
    def collate(self, items):
        time.sleep(0.2)
        return super().collate(items)

teacher = presets.build("tiny-unet", seed=1)
print("training", flush=True)
finetune(teacher, SlowTask(teacher), sys.argv[1], load_recipe("sparsedm").override(**{recipe!r}), progress=False,
         samples=False)
"""


def test_finetune_killed_after_a_stage_switch_resumes_bit_identical(tmp_path):
    """SparseDM with stages 3:4 → 2:4 and teacher: previous, SIGKILLed in stage 2: the resumed run rebuilds the
    previous stage's teacher from its snapshot and ends exactly as an uninterrupted run."""
    from surgeon.models import presets
    from surgeon.recipe import load_recipe
    from surgeon.training.run import finetune

    killed = _kill_after_first_checkpoint(tmp_path, FT_SCRIPT.format(recipe=FT_RECIPE))
    stopped_at = int(re.search(r"step-(\d+)", ckpt.list_checkpoints(killed / "checkpoints")[-1].name).group(1))
    assert 4 <= stopped_at < 12  # in stage 2, which began at step 4
    assert not (killed / "model").exists()

    recipe = load_recipe("sparsedm").override(**FT_RECIPE)
    teacher = presets.build("tiny-unet", seed=1)
    resumed = finetune(
        teacher, SyntheticImageTask(teacher), killed, recipe, resume=killed, progress=False, samples=False
    )
    full = finetune(teacher, SyntheticImageTask(teacher), tmp_path / "full", recipe, progress=False, samples=False)
    assert resumed.steps == full.steps == 12 and resumed.val_loss == full.val_loss
    a, b = surgeon.load(killed / "model"), surgeon.load(tmp_path / "full" / "model")
    _assert_identical(a.state_dict(), b.state_dict())
    # every loss after the kill, distilled from the rebuilt stage-1 teacher, is bit-equal
    assert _records(killed / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")
