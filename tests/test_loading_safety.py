"""Loading a model folder: no code runs without an opt-in, only safetensors are read (nothing is unpickled), and
a mistyped local path is not taken for a hub id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error, invoke, resign, write_images
from helpers_train import one_thread  # noqa: F401

import surgeon
from surgeon import SurgeonError

# ---- model folders never run code without an opt-in ---------------------------------------------------------------

PAYLOAD = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("the payload ran")
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)
"""


def _folder_naming(tmp_path, cls_path: str):
    """A surgeon-saved folder whose config.json names ``cls_path`` (what an attacker would edit in)."""
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(8, 8)
    folder = tmp_path / "model"
    surgeon.save(model, folder)
    (folder / "config.json").write_text(json.dumps({"_surgeon_class": cls_path, "_surgeon_init": {}}))
    resign(folder)  # digests and all: the trust check must stand on its own
    return folder


@pytest.mark.parametrize("relative", [False, True])
def test_a_folder_naming_a_python_file_runs_nothing_without_trust_code(tmp_path, monkeypatch, relative):
    (tmp_path / "evil.py").write_text(PAYLOAD)
    monkeypatch.chdir(tmp_path)
    folder = _folder_naming(tmp_path, f"{'evil.py' if relative else tmp_path / 'evil.py'}:Net")
    for call in (lambda: surgeon.load(folder), lambda: surgeon.load_model(folder)):
        with pytest.raises(SurgeonError, match="names code to run") as info:
            call()
        assert "trust_code=True" in info.value.hint and "--trust-code" in info.value.hint
    line, _ = assert_one_error(invoke("inspect", folder))
    assert "names code to run" in line
    assert not (tmp_path / "RAN").exists()
    # the opt-in: the user says they trust it
    result = invoke("inspect", folder, "--trust-code")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "RAN").exists()


@pytest.mark.parametrize("cls_path", ["subprocess:Popen", "torch.nn:Linear", "os:system", "tests.conftest:X"])
def test_a_folder_naming_another_module_imports_nothing_without_trust_code(tmp_path, cls_path):
    folder = _folder_naming(tmp_path, cls_path)
    module = cls_path.split(":")[0]
    was_loaded = module in sys.modules
    with pytest.raises(SurgeonError, match=f"names code to run \\(the module {module},"):
        surgeon.load(folder)
    assert (module in sys.modules) == was_loaded


def test_surgeons_own_models_and_diffusers_classes_need_no_opt_in(tmp_path):
    from surgeon.models.chirodiff import ChiroDiffNet

    model = ChiroDiffNet(hidden=8, layers=1)
    surgeon.save(model, tmp_path / "chiro")
    assert type(surgeon.load(tmp_path / "chiro")) is ChiroDiffNet
    unet = surgeon.load_model("tiny-unet")
    surgeon.save(unet, tmp_path / "unet")
    assert type(surgeon.load(tmp_path / "unet")) is type(unet)


# ---- safetensors only -----------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_from_pretrained_in_the_project_reads_safetensors_only():
    offenders = []
    for folder in ("surgeon", "cli", "examples", "benchmarks", "tests"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if ".from_pretrained(" in line and "use_safetensors=True" not in line:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}")
    assert not offenders, offenders


class _NoUnpickling:
    def __enter__(self):
        import pickle

        self.saved = pickle.Unpickler, torch.load
        pickle.Unpickler = lambda *a, **k: pytest.fail("something was unpickled")
        torch.load = lambda *a, **k: pytest.fail("torch.load was called")

    def __exit__(self, *exc):
        import pickle

        pickle.Unpickler, torch.load = self.saved


def test_a_pipeline_whose_autoencoder_is_pickled_only_is_refused_without_unpickling(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tmp_path / "pipe"
    surgeon.load_model("tiny-unet-cond").save_pretrained(pipe / "unet")
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    vae.save_pretrained(pipe / "vae", safe_serialization=False)  # diffusion_pytorch_model.bin only
    (pipe / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    )
    write_images(tmp_path / "images")
    with _NoUnpickling():
        result = invoke("sparsify", pipe, "--data", tmp_path / "images", "--out", tmp_path / "run", "--no-progress")
    line, _ = assert_one_error(result)
    assert "vae has no safetensors weights" in line and "diffusion_pytorch_model.bin" in line
    assert not (tmp_path / "run").exists()
    # and a model folder with pickled weights only
    with _NoUnpickling(), pytest.raises(SurgeonError, match="no safetensors weights"):
        surgeon.load_model(pipe / "vae")


# ---- a mistyped local path is not a hub id --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, words",
    [
        ("runs/nothere", "no such folder: runs/nothere"),
        ("runs/realrn", "no such folder: runs/realrn"),
        ("./model", "no such folder: ./model"),
        ("missing.safetensors", "no such file: missing.safetensors"),
    ],
)
def test_a_mistyped_local_path_says_no_such_folder_and_never_asks_the_hub(tmp_path, monkeypatch, ref, words):
    import surgeon.formats.loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(surgeon.formats.loading, "_load_hub", lambda ref: pytest.fail(f"{ref} was taken for a hub id"))
    (tmp_path / "runs" / "realrun").mkdir(parents=True)
    with pytest.raises(SurgeonError) as info:
        surgeon.load_model(ref)
    assert info.value.message == words
    if ref == "runs/realrn":
        assert info.value.hint == "did you mean runs/realrun?"


def test_a_hub_id_whose_org_is_no_local_folder_still_goes_to_the_hub(tmp_path, monkeypatch):
    import surgeon.formats.loading

    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(surgeon.formats.loading, "_load_hub", lambda ref: asked.append(ref))
    surgeon.load_model("google/ddpm-cifar10-32")
    assert asked == ["google/ddpm-cifar10-32"]
