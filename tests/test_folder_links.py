"""No file from outside a model folder travels with it or is read from it, and the trust-code allowlist checks the
class a record resolves to, not only the module it names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import resign

import surgeon
from surgeon.errors import SurgeonError
from surgeon.io.folders import check_folder, copy_folder, inside


def _pipeline(root: Path) -> Path:
    """A pipeline folder surgeon can export around: model_index.json, unet/, scheduler/."""
    pipe = root / "pipe"
    surgeon.load_model("tiny-unet").save_pretrained(pipe / "unet", safe_serialization=True)
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "x"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    return pipe


@pytest.fixture
def secret(tmp_path) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    return home


def _export_pipeline(tmp_path: Path, pipe: Path, out: Path):
    model = surgeon.load_model(pipe)
    return surgeon.export(model, out, format="dense", pipeline=pipe)


def _nothing_has(folder: Path, text: str) -> bool:
    return not folder.exists() or all(
        text not in p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file()
    )


def test_export_pipeline_refuses_a_file_linked_from_outside(tmp_path, secret):
    pipe = _pipeline(tmp_path)
    os.symlink(secret / ".ssh" / "id_rsa", pipe / "scheduler" / "notes.txt")
    with pytest.raises(SurgeonError, match=r"notes\.txt links outside the folder") as info:
        _export_pipeline(tmp_path, pipe, tmp_path / "deploy")
    assert "\n" not in info.value.message and info.value.hint
    assert not (tmp_path / "deploy").exists() and _nothing_has(tmp_path / "deploy", "PRIVATE")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy")]  # no temporary left either


def test_export_pipeline_refuses_a_folder_linked_from_outside(tmp_path, secret):
    pipe = _pipeline(tmp_path)
    os.symlink(secret, pipe / "extras")
    with pytest.raises(SurgeonError, match="extras links outside the folder"):
        _export_pipeline(tmp_path, pipe, tmp_path / "deploy")
    assert not (tmp_path / "deploy").exists()


def test_a_link_loop_ends_with_an_error(tmp_path):
    pipe = _pipeline(tmp_path)
    os.symlink(pipe / "scheduler", pipe / "scheduler" / "again")  # a folder that contains itself
    with pytest.raises(SurgeonError, match="symbolic link loop"):
        _export_pipeline(tmp_path, pipe, tmp_path / "deploy")
    os.unlink(pipe / "scheduler" / "again")
    os.symlink("b", pipe / "scheduler" / "a")
    os.symlink("a", pipe / "scheduler" / "b")
    with pytest.raises(SurgeonError, match="symbolic link loop"):
        check_folder(pipe)


def test_links_inside_the_folder_are_copied_as_plain_files(tmp_path):
    pipe = _pipeline(tmp_path)
    os.symlink("../model_index.json", pipe / "scheduler" / "index.json")
    _export_pipeline(tmp_path, pipe, tmp_path / "deploy")
    copied = tmp_path / "deploy" / "scheduler" / "index.json"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_text() == (pipe / "model_index.json").read_text()


def test_copy_folder_never_reads_a_device_file(tmp_path):
    (tmp_path / "src").mkdir()
    os.symlink("/dev/zero", tmp_path / "src" / "zero")
    with pytest.raises(SurgeonError, match="links outside the folder"):
        copy_folder(tmp_path / "src", tmp_path / "dst")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_loading_a_saved_folder_refuses_a_file_linked_from_outside(tmp_path, name):
    model = surgeon.load_model("tiny-unet")
    surgeon.save(model, tmp_path / "elsewhere")
    surgeon.save(model, tmp_path / "saved")
    (tmp_path / "saved" / name).unlink()
    os.symlink(tmp_path / "elsewhere" / name, tmp_path / "saved" / name)
    with pytest.raises(SurgeonError, match=f"{name} links outside the folder"):
        surgeon.load_model(tmp_path / "saved")


def test_loading_a_diffusers_folder_refuses_weights_linked_from_outside(tmp_path):
    surgeon.load_model("tiny-unet").save_pretrained(tmp_path / "real", safe_serialization=True)
    (tmp_path / "linked").mkdir()
    for f in (tmp_path / "real").iterdir():
        os.symlink(f, tmp_path / "linked" / f.name)
    with pytest.raises(SurgeonError, match="links outside the folder"):
        surgeon.load_model(tmp_path / "linked")
    os.symlink(tmp_path / "real", tmp_path / "alias")  # the folder itself reached through a link is fine
    assert isinstance(surgeon.load_model(tmp_path / "alias"), torch.nn.Module)


def test_a_hub_snapshot_may_link_into_its_own_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc", snap / "config.json")
    assert inside(snap, snap / "config.json") == (repo / "blobs" / "abc").resolve()


# ---- the trust-code allowlist checks what a record resolves to ------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "surgeon.models.chirodiff:torch.nn.Linear",
        "diffusers.models.modeling_utils:torch.nn.Linear",
        "surgeon.models.chirodiff:nn.Linear",
        "surgeon.models.presets:nn.Linear",
    ],
)
def test_a_record_cannot_walk_through_a_module_to_an_untrusted_class(tmp_path, spec):
    surgeon.save(torch.nn.Linear(3, 3), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"_surgeon_class": spec, "_surgeon_init": {"in_features": 3, "out_features": 3}})
    )
    resign(tmp_path / "m")  # a crafted folder, digests and all: the allowlist must stand on its own
    with pytest.raises(SurgeonError, match="nothing was built") as info:
        surgeon.load(tmp_path / "m")
    assert "--trust-code" in info.value.hint
    assert isinstance(surgeon.load(tmp_path / "m", trust_code=True), torch.nn.Linear)  # the opt-in still works


def test_surgeons_own_model_classes_stay_trusted(tmp_path):
    from surgeon.io.classes import resolve_class
    from surgeon.models.chirodiff import ChiroDiffNet

    assert resolve_class("surgeon.models.chirodiff:ChiroDiffNet") is ChiroDiffNet
    assert resolve_class("surgeon.models:ChiroDiffNet") is ChiroDiffNet
