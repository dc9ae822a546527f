"""Nothing is stored on the user's module but the parametrizations (the sparsifier owns its state, as in
torch.ao.pruning): no ``_surgeon*`` attribute on any module or class, no ``__deepcopy__`` patched on a class."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from helpers_train import SyntheticImageTask, one_thread, small_recipe  # noqa: F401
from torch import nn

import surgeon
from surgeon import load_model
from surgeon.masking import surgery
from surgeon.masking.surgery import get_plan, inject, sites
from surgeon.models.presets import build
from surgeon.recipe import load_recipe
from surgeon.training.run import finetune, sparsify

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
""")
PARAMETRIZE = "torch.nn.utils.parametrize"  # the generated Parametrized<Class> gets torch's own __deepcopy__


def _deepcopies(model: nn.Module) -> dict[type, object]:
    return {cls: cls.__dict__.get("__deepcopy__") for m in model.modules() for cls in type(m).__mro__}


def hidden_state(model: nn.Module, before: dict[type, object] | None = None) -> list[str]:
    """What surgeon left on ``model``: attributes named ``_surgeon*``/``__surgeon*`` on any of its modules or their
    classes, and any class ``__deepcopy__`` that differs from ``before`` or is not torch's generated one."""
    found = []
    for name, module in model.named_modules():
        found += [f"{name or 'model'}.{key}" for key in vars(module) if key.lstrip("_").startswith("surgeon")]
        for cls in type(module).__mro__:
            found += [f"{cls.__qualname__}.{key}" for key in vars(cls) if key.lstrip("_").startswith("surgeon")]
    for cls, hook in _deepcopies(model).items():
        if before is not None and cls in before:
            if hook is not before[cls]:
                found.append(f"{cls.__qualname__}.__deepcopy__ was replaced")
        elif hook is not None and getattr(hook, "__module__", None) != PARAMETRIZE:
            found.append(f"{cls.__qualname__}.__deepcopy__ is {hook!r}")
    return sorted(set(found))


def _net(tmp_path) -> str:
    (tmp_path / "net.py").write_text(NET_PY)
    return f"{tmp_path / 'net.py'}:Net"


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-chirodiff"])
@pytest.mark.parametrize("nm", [False, True])
def test_inject_fold_and_copies_leave_nothing_on_the_model(name, nm):
    model = build(name)
    before = _deepcopies(model)
    p = surgeon.plan(model, nm="2:4") if nm else surgeon.plan(model, sparsity=0.7)
    inject(model, p, init="random")
    assert sites(model) and hidden_state(model, before) == []
    assert get_plan(model) is p  # read from the masks themselves
    clone = copy.deepcopy(model)
    assert hidden_state(clone, before) == [] and get_plan(clone).to_dict() == p.to_dict()
    surgeon.fold(clone)
    assert hidden_state(model, before) == [] and hidden_state(clone, before) == []
    assert get_plan(clone) is None and get_plan(model) is p


def test_a_bare_linear_model_keeps_its_class_deepcopy():
    """The root module itself parametrized: its class becomes torch's generated one, with torch's own hook."""
    model = nn.Linear(8, 8)
    inject(model, surgeon.plan(model, sparsity=0.5, distribution="uniform"))
    assert type(model).__name__ == "ParametrizedLinear" and hidden_state(model) == []
    surgeon.fold(model)
    assert type(model) is nn.Linear and "__deepcopy__" not in vars(nn.Linear)


def test_load_model_of_each_kind_leaves_nothing(tmp_path):
    ref = _net(tmp_path)
    diffusers_folder = tmp_path / "unet"
    build("tiny-unet").save_pretrained(diffusers_folder)
    masked = build("tiny-unet")
    inject(masked, surgeon.plan(masked, sparsity=0.5))
    surgeon.save(masked, tmp_path / "saved")
    surgeon.export(masked, tmp_path / "one.safetensors", format="dense")
    for model in (
        load_model("tiny-unet"),
        load_model(ref),
        load_model(diffusers_folder),
        load_model(tmp_path / "saved"),
        load_model(tmp_path / "one.safetensors"),
    ):
        assert hidden_state(model) == []


def test_a_file_class_is_still_recorded_and_loads_back_from_its_copies(tmp_path):
    """The record of a model built from file.py:Class (no init arguments) is held outside the model."""
    model = load_model(_net(tmp_path))
    inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "saved")
    surgeon.export(model, tmp_path / "dense", format="dense")  # the exporter writes a copy
    for folder in ("saved", "dense"):
        loaded = surgeon.load(tmp_path / folder, trust_code=True)
        assert hidden_state(loaded) == [] and type(loaded).__name__ == "Net"
        x = torch.randn(2, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("fmt", ["dense", "packed", "semi-structured", "csr"])
def test_loading_each_export_format_leaves_nothing(tmp_path, fmt):
    model = build("tiny-unet")
    before = _deepcopies(model)
    p = surgeon.plan(model, nm="2:4") if fmt == "semi-structured" else surgeon.plan(model, sparsity=0.9)
    inject(model, p)
    surgeon.export(model, tmp_path / fmt, format=fmt, progress=False)
    assert hidden_state(model, before) == [] and get_plan(model) is p  # exporting a copy: the original as it was
    assert hidden_state(load_model(tmp_path / fmt)) == []


def test_sparsify_and_finetune_leave_nothing(tmp_path):
    model = build("tiny-unet")
    before = _deepcopies(model)
    recipe = small_recipe("rigl", **{"training.steps": 3})
    sparsify(model, recipe, SyntheticImageTask(model), tmp_path / "sparse", progress=False, samples=False)
    assert sites(model) and hidden_state(model, before) == []
    assert hidden_state(surgeon.load(tmp_path / "sparse" / "model")) == []

    teacher = build("tiny-unet", seed=1)
    before = _deepcopies(teacher)
    ft = load_recipe("ste").override(**{"training.steps": 2, "training.batch_size": 4, "training.eval_batches": 1})
    finetune(teacher, SyntheticImageTask(teacher), tmp_path / "ft", ft, progress=False, samples=False)
    assert hidden_state(teacher, before) == []
    student = surgeon.load(tmp_path / "ft" / "model")
    assert hidden_state(student) == [] and get_plan(student).nm == (2, 4)


def test_the_check_finds_an_attribute_or_a_deepcopy_patch(monkeypatch):
    """The invariant is checkable: the same checks catch what inject stored before (a plan attribute on the model,
    a __deepcopy__ patched onto a class)."""
    real = surgery.inject

    def storing(model, plan, **kwargs):
        real(model, plan, **kwargs)
        model._surgeon_plan = plan
        return model

    monkeypatch.setattr(surgery, "inject", storing)
    model = build("tiny-unet")
    before = _deepcopies(model)
    surgery.inject(model, surgeon.plan(model, sparsity=0.5))
    assert hidden_state(model, before) == ["model._surgeon_plan"]

    model = build("tiny-unet")
    before = _deepcopies(model)
    monkeypatch.setattr(type(model), "__deepcopy__", lambda self, memo: self, raising=False)
    assert hidden_state(model, before) == ["UNet2DModel.__deepcopy__ was replaced"]
    lin = inject(nn.Linear(8, 8), surgeon.plan(nn.Linear(8, 8), sparsity=0.5, distribution="uniform"))
    monkeypatch.setattr(type(lin), "__deepcopy__", lambda self, memo: self)  # what inject did to the generated class
    assert hidden_state(lin) == [f"ParametrizedLinear.__deepcopy__ is {type(lin).__deepcopy__!r}"]
