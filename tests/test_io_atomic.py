"""Atomic writes: a crash inside a forced overwrite or a checkpoint write never leaves nothing at the target."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers_train import one_thread  # noqa: F401

import surgeon
from surgeon import SurgeonError

# ---- a forced overwrite never leaves nothing at the target -----------------------------------------------------------

DIE_BETWEEN_RENAMES = """
import os, signal, sys
import surgeon.io.atomic

real = os.replace
calls = []

def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the old copy is aside, the new one not yet in place: the worst moment to die
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

surgeon.io.atomic.os.replace = replace
model = surgeon.load_model("tiny-unet")
surgeon.inject(model, surgeon.plan(model, sparsity=0.9), seed=1)
surgeon.save(model, sys.argv[1], force=True)
"""


def test_a_crash_inside_a_forced_overwrite_keeps_the_old_copy_findable_and_the_next_save_restores_it(tmp_path):
    from surgeon.io.atomic import siblings

    target = tmp_path / "m"
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), seed=0)
    surgeon.save(model, target)
    before = (target / "model.safetensors").read_bytes()
    script = tmp_path / "die.py"
    script.write_text(DIE_BETWEEN_RENAMES)
    proc = subprocess.run([sys.executable, str(script), str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr
    assert not target.exists()
    [old] = siblings(target, "old")
    assert (old / "model.safetensors").read_bytes() == before  # the old copy is intact, aside
    assert siblings(target, "tmp")  # and the dead writer's temporary is left over

    # a read reports where the old copy is
    with pytest.raises(SurgeonError, match="an overwrite of it was interrupted, the previous copy is") as info:
        surgeon.load(target)
    assert f"mv {old} {target}" in info.value.hint
    # a write without --force restores it first, so it is refused as existing: nothing was lost
    with pytest.raises(SurgeonError, match="exists"):
        surgeon.save(model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert not siblings(target, "old") and not siblings(target, "tmp")  # the stale temporary is gone too


def test_a_killed_checkpoint_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a pid that has exited
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".step-0000004.safetensors.tmp-{dead}-0123abcd"
    stale.write_bytes(b"x" * 1000)
    live = folder / f".step-0000004.safetensors.tmp-{os.getpid()}-0123abce"  # a writer still at work: kept
    live.write_bytes(b"x")
    from surgeon.io.atomic import atomic_path

    with atomic_path(folder / "step-0000004.safetensors") as tmp:
        tmp.write_bytes(b"new")
    assert not stale.exists() and live.exists()
    assert (folder / "step-0000004.safetensors").read_bytes() == b"new"
