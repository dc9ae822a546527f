"""Python API arguments of the wrong type raise one named error."""

from __future__ import annotations

import pytest
from helpers_train import one_thread  # noqa: F401

import surgeon
from surgeon import SurgeonError

# ---- API arguments of the wrong type are named ----------------------------------------------------------------------


def _api_calls(tmp_path):
    model = surgeon.load_model("tiny-unet")
    p = surgeon.plan(model, sparsity=0.5)
    (tmp_path / "file").write_text("x")
    return [
        (lambda: surgeon.plan("tiny-unet", sparsity=0.5), "model must be a torch.nn.Module, got str 'tiny-unet'"),
        (lambda: surgeon.inject("tiny-unet", p), "model must be a torch.nn.Module"),
        (lambda: surgeon.inject(model, "plan.json"), "plan must be a surgeon.masking.plan.Plan, got str"),
        (lambda: surgeon.inject(model, p, seed="1"), "seed must be an integer"),
        (lambda: surgeon.inject(model, p, lambda_w=float("nan")), "lambda_w must be a finite number"),
        (lambda: surgeon.save("tiny-unet", tmp_path / "out"), "model must be a torch.nn.Module"),
        (lambda: surgeon.save(model, 3), "folder must be a path, got int 3"),
        (lambda: surgeon.load_into("tiny-unet", tmp_path), "model must be a torch.nn.Module"),
        (lambda: surgeon.load_into(model, None), "folder must be a path, got NoneType"),
        (lambda: surgeon.load(None), "path must be a path"),
        (lambda: surgeon.load_model(3), "ref must be a model reference"),
        (lambda: surgeon.report("tiny-unet"), "model must be a torch.nn.Module"),
        (lambda: surgeon.fold("tiny-unet"), "model must be a torch.nn.Module"),
        (lambda: surgeon.find_targets(None), "model must be a torch.nn.Module, got NoneType"),
        (lambda: surgeon.plan(model, sparsity=0.5, include=["conv*", 3]), "each include pattern must be a string"),
        (lambda: surgeon.save(model, tmp_path / "file" / "out"), f"cannot create {tmp_path / 'file' / 'out'}: "),
    ]


def test_api_arguments_of_the_wrong_type_raise_a_named_one_line_error(tmp_path):
    for call, words in _api_calls(tmp_path):
        with pytest.raises(SurgeonError) as info:
            call()
        assert words in info.value.message, info.value.message
        assert ".tmp" not in info.value.message  # never the temporary name
        if "must be" in words and "finite" not in words:
            assert isinstance(info.value, TypeError)  # what Python callers catch for a wrong type
    assert not (tmp_path / "out").exists()


def test_a_single_include_string_is_one_pattern_not_one_per_character():
    model = surgeon.load_model("tiny-unet")
    assert list(surgeon.plan(model, sparsity=0.5, include="conv_in*").layers) == ["conv_in.weight"]
