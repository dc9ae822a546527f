"""ChiroDiffNet is a diffusers model: a diffusers folder, a ``_class_name`` record, and old records still load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgeon
from surgeon import SurgeonError, load_model
from surgeon.io.container import INTEGRITY
from surgeon.masking.surgery import get_plan, sites
from surgeon.models import ChiroDiffNet

INIT = {"hidden": 8, "layers": 2, "time_features": 6, "seed": 3}
# what surgeon wrote for ChiroDiffNet before it was a diffusers model: its class path and its init arguments
OLD_RECORD = {
    "_surgeon_class": "surgeon.models.chirodiff:ChiroDiffNet",
    "_surgeon_init": {
        "coords": 2,
        "dropout": 0.0,
        "features": 3,
        "fourier_scale": 4.0,
        "hidden": 8,
        "layers": 2,
        "num_train_timesteps": 1000,
        "seed": 3,
        "time_features": 6,
    },
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return torch.randn(2, 6, 3, generator=g) * mask[..., None], torch.tensor([4, 900]), mask


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}  # without diffusers' bookkeeping keys


def _out(model):
    with torch.no_grad():
        return model.eval()(*_inputs())


def _masked():
    torch.manual_seed(0)
    model = ChiroDiffNet(**INIT)
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    return model


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = ChiroDiffNet(**INIT)
    model.save_pretrained(tmp_path / "net")
    assert json.loads((tmp_path / "net" / "config.json").read_text())["_class_name"] == "ChiroDiffNet"
    for loaded in (ChiroDiffNet.from_pretrained(tmp_path / "net", use_safetensors=True), load_model(tmp_path / "net")):
        assert type(loaded) is ChiroDiffNet and _public(loaded.config) == _public(model.config)
        assert torch.equal(_out(loaded), _out(model))


def test_surgeon_records_it_like_a_diffusers_model(tmp_path):
    model = _masked()
    surgeon.save(model, tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert record["_class_name"] == "ChiroDiffNet" and "_surgeon_class" not in record
    assert record["hidden"] == 8 and record["time_features"] == 6
    loaded = surgeon.load(tmp_path / "saved")  # surgeon's own model: no trust_code needed
    assert sites(loaded).keys() == sites(model).keys() and torch.equal(_out(loaded), _out(model))

    surgeon.export(model, tmp_path / "dense", format="dense")  # a folder: diffusers' own layout
    assert (tmp_path / "dense" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "dense" / "model.safetensors").exists()
    folded = ChiroDiffNet.from_pretrained(tmp_path / "dense", use_safetensors=True)
    torch.testing.assert_close(_out(folded), _out(model), rtol=0, atol=1e-6)
    surgeon.export(model, tmp_path / "one.safetensors", format="dense")
    assert torch.equal(_out(load_model(tmp_path / "one.safetensors")), _out(folded))


def _written_before_integrity(file) -> None:
    with safe_open(str(file), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != INTEGRITY}
    save_file(load_file(str(file)), str(file), metadata=metadata)


def test_folders_and_files_saved_before_load_still(tmp_path):
    """An old record (class path and init arguments, written by hand here) in a saved folder and in a one-file
    export's metadata."""
    model = _masked()
    surgeon.save(model, tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(OLD_RECORD, indent=2, sort_keys=True) + "\n")
    _written_before_integrity(tmp_path / "old" / "model.safetensors")
    loaded = surgeon.load(tmp_path / "old")
    assert type(loaded) is ChiroDiffNet and get_plan(loaded).to_dict() == get_plan(model).to_dict()
    assert all(torch.equal(sites(loaded)[f].mask, s.mask) for f, s in sites(model).items())
    assert torch.equal(_out(loaded), _out(model))

    file = tmp_path / "old.safetensors"
    surgeon.export(model, file, format="packed")
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"])["_class_name"] == "ChiroDiffNet"
    old = {k: v for k, v in metadata.items() if k != INTEGRITY}  # old files had no integrity record either
    save_file(load_file(str(file)), str(file), metadata={**old, "config": json.dumps(OLD_RECORD)})
    assert torch.equal(_out(load_model(file)), _out(model))

    resaved = tmp_path / "resaved"
    surgeon.save(loaded, resaved)  # saved again, it gets the new record
    assert json.loads((resaved / "config.json").read_text())["_class_name"] == "ChiroDiffNet"


def test_unknown_config_keys_are_an_error_not_a_warning():
    with pytest.raises(SurgeonError, match="unknown heads"):
        ChiroDiffNet.from_config({**INIT, "heads": 2})
    built = ChiroDiffNet.from_config({**INIT, "_class_name": "ChiroDiffNet"})
    assert _public(built.config) == _public(ChiroDiffNet(**INIT).config)


def test_importing_surgeon_models_does_not_import_diffusers():
    code = "import sys, surgeon.models.presets, surgeon.formats.loading; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
