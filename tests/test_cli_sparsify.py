"""``surgeon sparsify``: bad inputs end in one ``error:`` + ``hint:`` pair with nothing half-written; a tiny run
writes every artifact and its saved model restores the trained masks exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_error, invoke, write_images
from helpers_train import one_thread  # noqa: F401
from PIL import Image
from safetensors import safe_open
from torch import nn

import surgeon
import surgeon.training.loop as train_mod
from surgeon.errors import SurgeonError
from surgeon.masking.surgery import sites
from surgeon.recipe import load_recipe
from surgeon.training.checkpoint import save_checkpoint


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_images(folder)
    return folder


def assert_nothing_written(out) -> None:
    assert not out.exists(), f"{out} was created: {list(out.iterdir())}"


def test_unknown_recipe_name(tmp_path, images):
    out = tmp_path / "out"
    r = invoke("sparsify", "tiny-unet", "--recipe", "riggle", "--data", images, "--out", out, "--steps", 2)
    assert_one_error(r, "unknown recipe 'riggle'")
    assert_nothing_written(out)


def test_recipe_yaml_with_an_unknown_key(tmp_path, images):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: rigl\nsparsity: 0.5\ndst: {delta_t: 10, regrow: gradient}\n")
    out = tmp_path / "out"
    r = invoke("sparsify", "tiny-unet", "--recipe", bad, "--data", images, "--out", out)
    assert_one_error(r, "unknown key 'dst.regrow'")
    assert_nothing_written(out)


def test_sparsity_out_of_range(tmp_path, images):
    out = tmp_path / "out"
    r = invoke("sparsify", "tiny-unet", "--recipe", "rigl", "--s", 1.2, "--data", images, "--out", out)
    assert_one_error(r, "sparsity 1.2")
    assert_nothing_written(out)


@pytest.mark.parametrize("content", ["empty", "no-images"])
def test_data_folder_without_images(tmp_path, content):
    data = tmp_path / "data"
    data.mkdir()
    if content == "no-images":
        (data / "notes.txt").write_text("not an image")
        (data / "fake.png").write_bytes(b"not a png either")
    out = tmp_path / "out"
    r = invoke("sparsify", "tiny-unet", "--data", data, "--out", out, "--steps", 2)
    assert_one_error(r, "no images found")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "ref, words",
    [
        ("no such model", "not a folder, file.py:Class, preset or hub id"),
        ("missing/model.py:Net", "does not exist"),
    ],
)
def test_model_that_is_neither_folder_id_nor_file_class(tmp_path, images, ref, words):
    out = tmp_path / "out"
    r = invoke("sparsify", ref, "--data", images, "--out", out, "--steps", 2)
    assert_one_error(r, "cannot load model", words)
    assert_nothing_written(out)


def test_resume_from_a_checkpoint_of_another_model(tmp_path, images):
    other = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.AdamW(other.parameters())
    other(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt = save_checkpoint(
        tmp_path / "other" / "checkpoints" / "step-0000002.safetensors", 2, other, opt, ["0.weight", "0.bias"], {}
    )
    out = tmp_path / "out"
    base = ["sparsify", "tiny-unet", "--data", images, "--out", out, "--steps", 4, "--no-progress"]
    r = invoke(*base, "--batch-size", 4, "--resume", ckpt, "--no-samples")
    assert_one_error(r, "belongs to another model")
    assert_nothing_written(out)
    # a run folder as --resume is resolved to its latest checkpoint, with the same refusal
    r = invoke(*base, "--resume", tmp_path / "other")
    assert_one_error(r, "belongs to another model")
    assert_nothing_written(out)


def test_existing_output_folder_is_not_overwritten(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("sparsify", "tiny-unet", "--data", images, "--out", out, "--steps", 2)
    assert_one_error(r, "exists")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def unpack_little(packed: torch.Tensor, shape) -> torch.Tensor:
    """docs/formats.md "Packed masks" decoded with numpy: bits little-endian along the last dim of the tensor viewed as [shape[0], -1]."""
    cols = int(np.prod(shape[1:]))
    bits = np.unpackbits(packed.numpy(), axis=1, bitorder="little")[:, :cols]
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


def test_tiny_end_to_end_run_writes_everything_and_restores_masks(tmp_path, images, monkeypatch):
    trained = {}
    real_train = train_mod.train

    def capture(model, *a, **k):
        trained["model"] = model
        return real_train(model, *a, **k)

    monkeypatch.setattr(train_mod, "train", capture)
    out = tmp_path / "run"
    r = invoke(
        "sparsify",
        "tiny-unet",
        "--recipe",
        "rigl",
        "--data",
        images,
        "--out",
        out,
        "--steps",
        4,
        "--batch-size",
        4,
        "--delta-t",
        2,
        "--p",
        0.2,
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    for name in ("model", "recipe.yaml", "metrics.jsonl", "samples.png", "summary.json"):
        assert (out / name).exists(), name
    assert not list(out.rglob("*.tmp*"))

    recipe = load_recipe(out / "recipe.yaml")
    assert (recipe.algorithm, recipe.training.steps, recipe.training.batch_size, recipe.dst.delta_t, recipe.dst.p) == (
        "rigl",
        4,
        4,
        2,
        0.2,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["algorithm"] == "rigl"
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "loss" in records[-1]
    assert [r["step"] for r in records if "mask_update" in r] == [2]  # ΔT_e = 2, stop step 0.75·4 = 3
    with Image.open(out / "samples.png") as im:
        im.load()
        assert min(im.size) >= 16

    model = trained["model"]
    loaded = surgeon.load(out / "model")
    want, got = sites(model), sites(loaded)
    assert want.keys() == got.keys() and len(want) > 0
    with safe_open(str(out / "model" / "model.safetensors"), framework="pt") as f:
        for fqn, site in want.items():
            assert torch.equal(got[fqn].mask, site.mask), fqn
            assert torch.equal(unpack_little(f.get_tensor(f"{fqn}.mask"), site.mask.shape), site.mask), fqn
            assert torch.equal(got[fqn].original, site.original.detach()), fqn
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


@pytest.mark.parametrize("recipe", ["rigl", "magran"])
def test_the_largest_seed_the_recipe_accepts_trains_through_a_mask_update(tmp_path, images, recipe):
    out = tmp_path / "out"
    seed = 2**63 - 1  # the recipe's upper bound; the update's generator once overflowed torch's seed range here
    args = [recipe, "--s", 0.5, "--data", images, "--out", out, "--steps", 4, "--batch-size", 4, "--delta-t", 2]
    r = invoke("sparsify", "tiny-unet", "--recipe", *args, "--seed", seed, "--no-progress", "--no-samples")
    assert r.exit_code == 0, r.output
    assert load_recipe(out / "recipe.yaml").training.seed == seed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "mask_update" in r] == [2]
    assert records[-1]["step"] == 4


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_requested_fsdp_or_deepspeed_run_is_refused_before_training(tmp_path, images, monkeypatch, var):
    # what `accelerate launch --use_fsdp` / `--use_deepspeed` set for every process; on CPU Accelerate would
    # otherwise quietly run plain DDP (FSDP2 on GPUs trains: tests/test_fsdp.py)
    monkeypatch.setenv(var, "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    r = invoke("sparsify", "tiny-unet", "--data", images, "--out", out, "--steps", 2)
    if var == "ACCELERATE_USE_DEEPSPEED":
        assert_one_error(r, "does not train under DeepSpeed", hint=["--use_fsdp --fsdp_version 2", "--multi_gpu"])
    else:
        words = ("Accelerate enables FSDP only on GPUs", "silently be plain DDP")
        assert_one_error(r, *words, hint=["drop --use_fsdp", "accelerate launch --multi_gpu"])
    assert_nothing_written(out)


@pytest.mark.parametrize("version", [None, "1", "2"])
def test_fsdp_on_gpus_must_be_fsdp2(monkeypatch, version):
    # before the Accelerator exists (make_accelerator): what `accelerate launch --use_fsdp [--fsdp_version V]` sets
    from surgeon.training.loop import refuse_sharded_training

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if version is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    else:
        monkeypatch.setenv("FSDP_VERSION", version)
    if version == "2":
        refuse_sharded_training()  # FSDP2 trains
        return
    with pytest.raises(SurgeonError, match="FSDP2 only") as e:
        refuse_sharded_training()
    assert "--fsdp_version 2" in e.value.hint
