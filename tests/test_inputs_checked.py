"""Inputs are checked before work starts, every image decode failure names its file, and metadata and diffusers
folders that would leave a model half-built are refused by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import surgeon
from surgeon.data.images import ImageFolder
from surgeon.errors import SurgeonError


def _gray(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8), mode="L").save(folder / f"{i}.png")


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    (tmp_path / "d").mkdir()
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "d" / "wide.png")
    assert Image.open(tmp_path / "d" / "wide.png").mode.startswith("I;16")
    image = ImageFolder(tmp_path / "d", 16, 1)[0]
    pixels = ((image + 1) * 127.5).round().to(torch.int64).flatten()
    assert pixels.min() == 0 and pixels.max() == 255 and len(pixels.unique()) > 200  # the full ramp survives


def test_skipped_files_are_counted_in_one_warning_line(tmp_path, caplog):
    _gray(tmp_path / "d")
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "d" / "broken2.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        data = ImageFolder(tmp_path / "d", 16, 1)
    assert len(data) == 3
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 2 of 5 image files" in lines[0] and "broken" in lines[0], lines


def test_a_decompression_bomb_is_skipped_not_decoded(tmp_path, caplog):
    _gray(tmp_path / "d")
    Image.new("L", (1, 1)).save(tmp_path / "d" / "bomb.png")
    data = bytearray((tmp_path / "d" / "bomb.png").read_bytes())
    data[16:24] = (200_000).to_bytes(4, "big") * 2
    (tmp_path / "d" / "bomb.png").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        assert len(ImageFolder(tmp_path / "d", 16, 1)) == 3
    assert any("bomb.png" in r.getMessage() for r in caplog.records)


def test_damage_that_verify_misses_names_the_file_when_decoded(tmp_path):
    (tmp_path / "d").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "d" / "photo.jpg", quality=95)
    whole = (tmp_path / "d" / "photo.jpg").read_bytes()
    (tmp_path / "d" / "photo.jpg").write_bytes(whole[: len(whole) // 3])  # verify() does not decode JPEG data
    data = ImageFolder(tmp_path / "d", 16, 3)
    with pytest.raises(SurgeonError, match=r"cannot decode image .*photo\.jpg") as info:
        data[0]
    assert "--resume" in info.value.hint


def test_a_batch_larger_than_the_data_is_refused_before_training(tmp_path):
    from surgeon.data.sampler import BatchSampler

    with pytest.raises(SurgeonError, match="batch size 1000000000 is larger than the 8 training examples"):
        BatchSampler(8, 1_000_000_000, seed=0)


def test_a_diffusers_folder_missing_a_tensor_names_it_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    surgeon.load_model("tiny-unet").save_pretrained(tmp_path / "m", safe_serialization=True)
    file = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["conv_in.bias"]
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(SurgeonError, match="has no weights for 1 tensors of UNet2DModel: conv_in.bias"):
        surgeon.load_model(tmp_path / "m")


def test_a_checkpoint_header_of_the_wrong_form_is_corrupt_metadata(tmp_path):
    from helpers_train import SyntheticImageTask, small_recipe, tiny_model
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from surgeon.training import checkpoint as ckpt
    from surgeon.training.loop import train

    recipe = small_recipe("rigl", **{"training.steps": 4, "training.checkpoint_every": 2, "training.batch_size": 2})
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "run", progress=False, stop_after=2)
    path = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    with safe_open(str(path), "pt") as f:
        raw = dict(f.metadata())
    for key, value, words in (("step", "two", "step"), ("algorithm", "[" * 50_000, "algorithm")):
        save_file(load_file(path), str(path), metadata={**raw, key: value})
        with pytest.raises(SurgeonError, match=f"corrupt metadata in {path}: {words}"):
            ckpt.check_resumable(path)
