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


def test_files_with_the_older_blake2b_digests_still_load_and_their_damage_still_shows(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from surgeon.io.container import tensor_digest

    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    surgeon.save(model, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        raw = f.metadata()
    tensors = load_file(str(path))
    assert all(d.startswith("b3:") for d in json.loads(raw["digests"]).values())
    legacy = {name: tensor_digest(t, legacy=True) for name, t in tensors.items()}
    assert all(len(d) == 32 and ":" not in d for d in legacy.values())
    older = {k: v for k, v in raw.items() if k != "integrity"}  # files that old had no integrity record either
    save_file(tensors, str(path), metadata={**older, "digests": json.dumps(legacy)})
    reloaded = surgeon.load(tmp_path / "m")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())
    mask = f"{next(iter(surgeon.masking.surgery.sites(model)))}.mask"
    swap_two_bits(path, mask)
    with pytest.raises(SurgeonError, match=rf"^damaged file: {mask} in "):
        surgeon.load(tmp_path / "m")
