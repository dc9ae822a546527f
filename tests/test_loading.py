"""load_model: every kind of reference, and a one-line error for each way a reference can be wrong."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import surgeon
from surgeon import SurgeonError, load_model
from surgeon.masking.surgery import sites
from surgeon.models.presets import build

NET_PY = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class Configured(Net):
        def __init__(self, width=8):
            super().__init__()
            self.config = {"width": width}

    class NeedsArgs(nn.Module):
        def __init__(self, width):
            super().__init__()

    NOT_A_MODULE = 3
""")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def error_of(ref) -> SurgeonError:
    with pytest.raises(SurgeonError) as err:
        load_model(ref)
    assert "\n" not in err.value.message and err.value.hint
    return err.value


def test_preset():
    model = load_model("tiny-unet")
    assert type(model).__name__ == "UNet2DModel"
    assert same_weights(model, build("tiny-unet"))


def test_diffusers_model_folder(tmp_path):
    unet = build("tiny-unet")
    unet.save_pretrained(tmp_path / "unet")
    assert same_weights(load_model(tmp_path / "unet"), unet)


def test_pipeline_folder_takes_the_unet(tmp_path):
    unet = build("tiny-unet")
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    assert same_weights(load_model(str(tmp_path / "pipe")), unet)


def test_pipeline_folder_takes_the_transformer_when_there_is_no_unet(tmp_path):
    dit = build("tiny-dit")
    dit.save_pretrained(tmp_path / "pipe" / "transformer")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    loaded = load_model(tmp_path / "pipe")
    assert type(loaded).__name__ == "DiTTransformer2DModel" and same_weights(loaded, dit)


def test_surgeon_folder_comes_back_masked(tmp_path):
    model = build("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "sparse")
    loaded = load_model(tmp_path / "sparse")
    assert sites(loaded).keys() == sites(model).keys()


def test_file_class_is_built_without_arguments(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    model = load_model(f"{tmp_path / 'net.py'}:Net")
    assert [n for n, _ in model.named_children()] == ["fc1", "fc2"]
    assert type(load_model(f"{tmp_path / 'net.py'}:Net")) is type(model)  # the file is imported once


def test_file_class_with_config_saves_and_loads_back(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    model = load_model(f"{tmp_path / 'net.py'}:Configured")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "sparse")

    loaded = surgeon.load(tmp_path / "sparse", trust_code=True)  # finds the class again through the recorded file

    assert type(loaded) is type(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_file_class_built_by_load_model_loads_back_without_a_config(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    model = load_model(f"{tmp_path / 'net.py'}:Net")  # built with no arguments, so load() can rebuild it
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "sparse")
    loaded = surgeon.load(tmp_path / "sparse", trust_code=True)
    assert all(torch.equal(sites(loaded)[f].mask, s.mask) for f, s in sites(model).items())
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_module_built_by_the_user_without_config_loads_into_a_built_model(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    ref = f"{tmp_path / 'net.py'}:Net"
    model = type(load_model(ref))()  # the user's own construction: its init arguments are unknown to surgeon
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "sparse")

    with pytest.raises(SurgeonError, match="without init arguments"):
        surgeon.load(tmp_path / "sparse", trust_code=True)
    loaded = surgeon.load_into(load_model(ref), tmp_path / "sparse")
    assert all(torch.equal(sites(loaded)[f].mask, s.mask) for f, s in sites(model).items())


def test_file_class_errors(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    net = tmp_path / "net.py"

    assert "does not exist" in error_of(f"{tmp_path / 'missing.py'}:Net").message
    assert error_of(f"{net}:Nope").message.endswith(f"{net} has no class Nope")
    assert "not as a torch.nn.Module" in error_of(f"{net}:NOT_A_MODULE").message
    assert error_of(f"{net}:NeedsArgs").message.startswith("cannot construct NeedsArgs()")
    assert "ModuleNotFoundError" in error_of(f"{tmp_path / 'broken.py'}:Net").message
    assert "name the class" in error_of(str(net)).message


def test_unknown_reference():
    err = error_of("no-such-model")
    assert err.message == "cannot load model no-such-model: not a folder, file.py:Class, preset or hub id"
    assert "tiny-unet" in err.hint


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = error_of("some-org/some-model")
    assert "some-org/some-model" in err.message and "offline" in err.message


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "has no config.json, model_index.json or model.safetensors" in error_of(tmp_path / "empty").message

    (tmp_path / "noclass").mkdir()
    (tmp_path / "noclass" / "config.json").write_text("{}")
    assert "has no _class_name" in error_of(tmp_path / "noclass").message

    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text('{"_class_name": "FluxCapacitor"}')
    assert "unknown diffusers model class 'FluxCapacitor'" in error_of(tmp_path / "alien").message

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}')
    assert "has no unet or transformer" in error_of(tmp_path / "pipe").message

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert "cannot read" in error_of(tmp_path / "bad").message


def test_pickle_weights_are_never_loaded(tmp_path):
    build("tiny-unet").save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert not list((tmp_path / "unet").glob("*.safetensors"))
    assert "has no safetensors weights (it has diffusion_pytorch_model.bin" in error_of(tmp_path / "unet").message
