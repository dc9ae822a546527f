"""The container's per-tensor digests: a damaged model file or training checkpoint is refused naming the tensor."""

from __future__ import annotations

import pytest
from helpers import assert_one_error, invoke, swap_two_bits
from helpers_train import (
    one_thread,  # noqa: F401
    train_checkpointed,
)
from safetensors import safe_open

import surgeon
from surgeon import SurgeonError

# ---- integrity: a per-tensor digest, verified on load -----------------------------------------------------------------


def test_a_mask_with_two_bits_swapped_is_reported_as_a_damaged_file(tmp_path):
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    surgeon.save(model, tmp_path / "m")
    mask = f"{next(iter(surgeon.masking.surgery.sites(model)))}.mask"
    swap_two_bits(tmp_path / "m" / "model.safetensors", mask)
    with pytest.raises(SurgeonError, match=rf"^damaged file: {mask} in "):
        surgeon.load(tmp_path / "m")
    line, _ = assert_one_error(invoke("inspect", tmp_path / "m"))
    assert line.startswith(f"error: damaged file: {mask}")


def test_a_damaged_training_checkpoint_is_refused_naming_the_tensor(tmp_path):
    train_checkpointed(tmp_path / "run", stop_after=4)
    path = tmp_path / "run" / "checkpoints" / "step-0000004.safetensors"
    with safe_open(str(path), "pt") as f:
        name = next(k for k in f.keys() if k.endswith(".original"))
    swap_two_bits(path, name)
    with pytest.raises(SurgeonError, match=f"damaged file: {name}"):
        train_checkpointed(tmp_path / "run", resume=path)
