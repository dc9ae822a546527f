"""Integrity covers what rebuilds or reinterprets a model: config.json and the header, not only the tensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import raw_header, resign
from safetensors.torch import load_file, save_file

import surgeon
from surgeon.errors import SurgeonError
from surgeon.io.container import INTEGRITY


def _forward(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x, torch.tensor([3, 10])).sample


@pytest.fixture
def saved(tmp_path) -> Path:
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    return surgeon.save(model, tmp_path / "saved")


def test_a_changed_config_json_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "norm_eps": 0.5}))  # builds, loads, computes otherwise
    for load in (surgeon.load, surgeon.load_model):
        with pytest.raises(SurgeonError, match=r"damaged file: .*config\.json does not match the digest") as info:
            load(saved)
        assert "\n" not in info.value.message and info.value.hint


def test_reformatting_config_json_changes_nothing(saved):
    expected = _forward(surgeon.load(saved))
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config, indent=8, sort_keys=False))
    assert torch.equal(_forward(surgeon.load(saved)), expected)


@pytest.mark.parametrize("key, change", [("recipe", {"algorithm": "rigl"}), ("extra", {"pipeline": "/elsewhere"})])
def test_a_changed_header_entry_is_refused(saved, key, change):
    file = saved / "model.safetensors"
    raw = raw_header(file)
    save_file(load_file(file), str(file), metadata={**raw, key: json.dumps(change)})
    with pytest.raises(SurgeonError, match="damaged file: the metadata of"):
        surgeon.load(saved)


def test_a_one_file_export_covers_the_config_inside_it(tmp_path):
    model = surgeon.load_model("tiny-unet")
    path = tmp_path / "m.safetensors"
    surgeon.export(model, path, format="dense")
    raw = raw_header(path)
    config = json.loads(raw["config"])
    save_file(load_file(path), str(path), metadata={**raw, "config": json.dumps({**config, "norm_eps": 0.5})})
    with pytest.raises(SurgeonError, match="damaged file: the metadata of"):
        surgeon.load(path)


def test_a_file_written_before_the_integrity_record_loads_with_a_notice(saved, caplog):
    expected = _forward(surgeon.load(saved))
    file = saved / "model.safetensors"
    raw = {k: v for k, v in raw_header(file).items() if k != INTEGRITY}
    save_file(load_file(file), str(file), metadata=raw)
    with caplog.at_level(logging.WARNING, logger="surgeon"):
        model = surgeon.load(saved)
    assert torch.equal(_forward(model), expected)
    notices = [
        r.getMessage() for r in caplog.records if "before its config and metadata had a digest" in r.getMessage()
    ]
    assert len(notices) == 1 and str(file) in notices[0]


def test_a_resigned_folder_loads(saved):
    """The crafted-folder helper other tests use really produces a folder that passes the check."""
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "norm_eps": 0.5}))
    resign(saved)
    assert surgeon.load(saved).config.norm_eps == 0.5
