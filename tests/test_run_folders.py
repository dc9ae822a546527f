"""The run pipeline's output folders: a model that fails on its first batch is named and leaves no output; an
--out that cannot be made is refused before loading; resumes write to their own run; a saved sparse model is a
valid MODEL for sparsify."""

from __future__ import annotations

import pytest
import torch
from helpers import WRONG_SHAPE, assert_one_error, invoke, write_images
from helpers_train import (
    SyntheticImageTask,
    masks_of,
    one_thread,  # noqa: F401
    small_recipe,
    tiny_model,
)

import surgeon
from surgeon import SurgeonError
from surgeon.training import checkpoint as ckpt
from surgeon.training.loop import train

# ---- catch-all cases get their own message; nothing half-made is left ------------------------------------------------


def test_a_model_whose_output_has_the_wrong_shape_is_named_and_leaves_no_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "net.py").write_text(WRONG_SHAPE)
    write_images(tmp_path / "images")
    out = tmp_path / "run"
    line, _ = assert_one_error(
        invoke(
            "sparsify",
            f"{tmp_path / 'net.py'}:HalfWidth",
            "--data",
            tmp_path / "images",
            "--steps",
            2,
            "--batch-size",
            2,
            "--out",
            out,
            "--no-progress",
        )
    )
    assert "output has shape [2, 1, 16, 8], but the noise it must predict has shape [2, 1, 16, 16]" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["under-a-file", "exists-as-file"])
def test_an_out_that_cannot_be_created_is_refused_before_the_model_loads(tmp_path, monkeypatch, kind):
    import surgeon.formats.loading

    monkeypatch.setattr(surgeon.formats.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if kind == "under-a-file" else tmp_path / "file"
    line, _ = assert_one_error(invoke("sparsify", "tiny-unet", "--out", out, "--no-progress"))
    assert str(out) in line
    assert (tmp_path / "file").read_text() == "x"


def test_resume_without_out_continues_in_the_resumed_run_folder_and_never_touches_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images")
    args = [
        "tiny-unet",
        "--recipe",
        "static",
        "--data",
        "images",
        "--steps",
        4,
        "--batch-size",
        2,
        "--no-progress",
        "--no-samples",
    ]
    # a complete run sits where the default --out would point
    assert invoke("sparsify", *args).exit_code == 0
    default = tmp_path / "runs" / "tiny-unet-static-s0.5"
    before = {p: p.read_bytes() for p in default.rglob("*") if p.is_file()}
    # another run, interrupted at step 2 (stop_after stands for Ctrl-C here)
    recipe = small_recipe(
        "static",
        **{"training.steps": 4, "training.batch_size": 2, "training.checkpoint_every": 2, "training.log_every": 1},
    )
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "A", progress=False, stop_after=2)
    resumed = invoke("sparsify", *args, "--resume", tmp_path / "A" / "checkpoints" / "step-0000002.safetensors")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "A" / "model" / "model.safetensors").is_file()
    assert {p: p.read_bytes() for p in default.rglob("*") if p.is_file()} == before


def test_resume_into_another_non_empty_folder_needs_force(tmp_path, monkeypatch):
    import surgeon.formats.loading

    monkeypatch.setattr(surgeon.formats.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = small_recipe("static", **{"training.steps": 4, "training.checkpoint_every": 2})
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "A", progress=False, stop_after=2)
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "keep.txt").write_text("mine")
    line, _ = assert_one_error(
        invoke("sparsify", "tiny-unet", "--recipe", "static", "--resume", tmp_path / "A", "--out", tmp_path / "B")
    )
    assert "holds another run than the one resumed" in line
    assert (tmp_path / "B" / "keep.txt").read_text() == "mine"


def test_a_forced_fresh_run_never_leaves_the_old_runs_checkpoints_for_resume(tmp_path):
    recipe = small_recipe(
        "static", **{"training.steps": 8, "training.checkpoint_every": 2, "training.keep_checkpoints": 0}
    )
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "run", progress=False)  # checkpoints 2, 4, 6
    short = small_recipe("static", **{"training.steps": 4, "training.checkpoint_every": 2})
    model = tiny_model(short)
    with pytest.raises(SurgeonError, match="holds checkpoints of an earlier run"):
        train(model, SyntheticImageTask(model), short, tmp_path / "run", progress=False)
    from surgeon.training.run import open_run

    open_run(tmp_path / "run", short, force=True)
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == []


# ---- a sparse model saved by surgeon is a valid MODEL for sparsify ---------------------------------------------------


def _saved_sparse_model(tmp_path):
    recipe = small_recipe("rigl", **{"training.steps": 3, "sparsity": 0.8})
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "first", progress=False)
    surgeon.save(model, tmp_path / "first" / "model")
    return tmp_path / "first" / "model", masks_of(model)


@pytest.mark.parametrize("ref", ["model", "run folder"])
def test_sparsify_continues_a_saved_sparse_model_from_its_own_masks_with_init_pretrained(tmp_path, ref):
    from surgeon.training.run import sparsify

    folder, masks = _saved_sparse_model(tmp_path)
    recipe = small_recipe("static", **{"training.steps": 2, "sparsity": 0.5})
    task = SyntheticImageTask(surgeon.load(folder))
    sparsify(
        folder if ref == "model" else folder.parent,
        recipe,
        task,
        tmp_path / "again",
        init="pretrained",
        progress=False,
        samples=False,
    )
    again = surgeon.load(tmp_path / "again" / "model")
    assert masks_of(again).keys() == masks.keys()
    assert all(torch.equal(masks_of(again)[f], m) for f, m in masks.items())  # static: its own masks, unchanged


def test_sparsify_restarts_a_saved_sparse_model_from_scratch(tmp_path):
    from surgeon.training.run import sparsify

    folder, masks = _saved_sparse_model(tmp_path)
    recipe = small_recipe("static", **{"training.steps": 2, "sparsity": 0.5, "training.seed": 7})
    task = SyntheticImageTask(surgeon.load(folder))
    summary = sparsify(str(folder), recipe, task, tmp_path / "again", init="scratch", progress=False, samples=False)
    again = surgeon.load(tmp_path / "again" / "model")
    assert abs(summary.sparsity - 0.5) < 0.01  # the recipe's budget, not the input's 0.8
    assert any(not torch.equal(masks_of(again)[f], m) for f, m in masks.items() if f in masks_of(again))
