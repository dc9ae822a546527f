"""Outputs never destroy their inputs, have one writer at a time, and are whole or absent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import write_images
from helpers_train import PYTHON, REPO, subprocess_env
from typer.testing import CliRunner

import surgeon
from surgeon.cli.app import app
from surgeon.errors import SurgeonError
from surgeon.io.lock import exclusive, lock_file

FAST = ["--data", "images", "--no-progress", "--no-samples", "--steps", "2", "--batch-size", "2"]


def _one_error(result, words: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    assert words in lines[0], lines[0]
    assert "SURGEON_DEBUG" not in lines[1], lines[0]
    return lines[0]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "images", n=8)
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    surgeon.save(model, tmp_path / "saved")
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


# ---- an output never is, holds or lies inside an input --------------------------------------------------------------


def test_export_refuses_an_out_that_contains_the_model(work):
    r = _run("sparsify", "tiny-unet", "--recipe", "static", "--out", "runX", *FAST)
    assert r.exit_code == 0, r.output
    (work / "runX" / "checkpoints").mkdir(exist_ok=True)
    (work / "runX" / "checkpoints" / "keep.txt").write_text("a checkpoint")
    before = _tree(work / "runX")
    _one_error(_run("export", "runX/model", "--out", "runX", "--force"), "output runX contains the model runX/model")
    assert _tree(work / "runX") == before


@pytest.mark.parametrize(
    "args",
    [
        ["sparsify", "saved", "--out", "saved", "--force", "--init", "pretrained"],
        ["finetune", "--teacher", "saved", "--out", "saved", "--force"],
        ["finetune", "saved", "--teacher", "tiny-unet", "--out", "saved/run"],
    ],
    ids=["sparsify-out-is-model", "finetune-out-is-teacher", "finetune-out-inside-model"],
)
def test_training_refuses_an_out_that_is_its_input(work, args):
    before = _tree(work / "saved")
    _one_error(_run(*args, *FAST), "the ")
    assert _tree(work / "saved") == before


def test_eval_refuses_an_out_that_is_a_model(work):
    before = _tree(work / "saved")
    _one_error(
        _run("eval", "saved", "--data", "images", "--out", "saved", "--force"), "output saved is the model saved"
    )
    assert _tree(work / "saved") == before


@pytest.mark.parametrize(
    "args",
    [["export", "tiny-unet", "--out", "link", "--force"], ["sparsify", "tiny-unet", "--out", "link", "--force", *FAST]],
    ids=["export", "sparsify"],
)
def test_a_symlinked_output_is_refused_by_every_command(work, args):
    (work / "target" / "checkpoints").mkdir(parents=True)
    (work / "target" / "checkpoints" / "step-0000002.safetensors").write_text("precious")
    os.symlink("target", work / "link")
    _one_error(_run(*args), "output link is a symbolic link (to target)")
    assert (work / "link").is_symlink() and (work / "target" / "checkpoints" / "step-0000002.safetensors").exists()


# ---- one writer: a lock the OS releases ------------------------------------------------------------------------------

HOLD = """
import sys, time
from surgeon.io.lock import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(work):
    """A second process holding the one-writer lock of work/held; yields its pid."""
    proc = subprocess.Popen(
        [str(PYTHON), "-c", HOLD, str(work / "held")], stdout=subprocess.PIPE, env=subprocess_env(), text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["sparsify", "tiny-unet", "--out", "held", "--force", *FAST],
        ["finetune", "--teacher", "tiny-unet", "--out", "held", "--force", *FAST],
        ["export", "saved", "--out", "held", "--force"],
        ["eval", "tiny-unet", "--data", "images", "--out", "held", "--force", "--n", "4"],
    ],
    ids=["sparsify", "finetune", "export", "eval"],
)
def test_a_second_writer_is_refused_with_the_owners_pid(work, holder, args):
    (work / "held").mkdir()
    (work / "held" / "metrics.jsonl").write_text('{"step": 1}\n')
    _one_error(_run(*args), f"held is being written by process {holder.pid}")
    assert (work / "held" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_killed_owner_releases_the_lock_at_once(work, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive(work / "held"):
        assert lock_file(work / "held").read_text().strip() == str(os.getpid())
    assert not lock_file(work / "held").exists()


def test_two_real_sparsify_runs_on_one_folder(work):
    """A running `surgeon sparsify` owns its folder: a forced second run is refused with its pid; once the first is
    SIGKILLed, the second starts at once."""
    first = subprocess.Popen(
        [str(PYTHON), "-m", "surgeon.cli.app", "sparsify", "tiny-unet", "--recipe", "static", "--out", "run", *FAST]
        + ["--steps", "1000000", "--no-samples"],
        cwd=work,
        env={**subprocess_env(), "SURGEON_CACHE": str(work / "cache")},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (work / "run" / "metrics.jsonl").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.2)
        _one_error(_run("sparsify", "tiny-unet", "--out", "run", "--force", *FAST), f"process {first.pid}")
    finally:
        first.kill()
        first.wait()
    r = _run("sparsify", "tiny-unet", "--recipe", "static", "--out", "run", "--force", *FAST)
    assert r.exit_code == 0, r.output
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) <= 2


def test_threads_saving_one_folder_never_collide(work):
    model = surgeon.load_model("tiny-unet")
    outcomes: list[str] = []

    def save():
        try:
            surgeon.save(model, work / "shared", force=True)
            outcomes.append("saved")
        except SurgeonError as e:
            outcomes.append(e.message)

    threads = [threading.Thread(target=save) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == len(threads)  # every thread ended with the save or a one-line error, none crashed
    assert "saved" in outcomes
    assert all(o == "saved" or "being written by another thread of this process" in o for o in outcomes), outcomes
    assert isinstance(surgeon.load(work / "shared"), type(model))
    assert [p.name for p in work.iterdir() if p.name.startswith(".shared")] == []


# ---- outputs are whole or absent ------------------------------------------------------------------------------------


def test_eval_force_replaces_the_whole_folder(work):
    (work / "data" / "train").mkdir(parents=True)
    write_images(work / "data" / "validation", n=8)
    write_images(work / "data" / "train", n=8)
    eval_args = ["--data", "data", "--out", "ev", "--n", "4", "--sample-steps", "1", "--no-progress"]
    r = _run("eval", "tiny-unet", "saved", *eval_args)
    assert r.exit_code == 0, r.output
    assert (work / "ev" / "fid_vs_sparsity.png").is_file()
    r = _run("eval", "tiny-unet", *eval_args, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (work / "ev").iterdir()) == ["results.json", "samples.png"]
    assert list(json.loads((work / "ev" / "results.json").read_text())["plots"]) == ["samples"]


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace
import surgeon.evaluation.plots as plots
from surgeon.evaluation.evaluate import Evaluation, write_outputs

def dies(panels, path, title):
    Path(path).write_bytes(b"half a picture")
    os.kill(os.getpid(), signal.SIGKILL)

plots.grids_side_by_side = dies
result = Evaluation("data", SimpleNamespace(label="x"), 4, 1, ("fid",), [])
write_outputs(result, [], Path(sys.argv[1]))
"""


@pytest.mark.parametrize("existing", [True, False])
def test_a_sigkill_while_eval_writes_leaves_the_previous_folder_or_nothing(tmp_path, existing):
    out = tmp_path / "ev"
    if existing:
        out.mkdir()
        (out / "results.json").write_text('{"previous": true}')
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_WRITING, str(out)], env=subprocess_env(), cwd=REPO, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["results.json"]
        assert (out / "results.json").read_text() == '{"previous": true}'
    else:
        assert not out.exists()


def test_a_temporary_that_vanishes_while_listed_is_skipped(tmp_path, monkeypatch):
    from pathlib import Path

    from surgeon.io.atomic import sibling, siblings

    target = tmp_path / "out"
    kept, gone = sibling(target, "tmp"), sibling(target, "tmp")
    kept.write_text("a")
    gone.write_text("b")
    real = Path.lstat

    def lstat(self, *args, **kwargs):
        if self == gone:  # another writer renamed it after the directory was listed
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "lstat", lstat)
    assert siblings(target, "tmp") == [kept]
