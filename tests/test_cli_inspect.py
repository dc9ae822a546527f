"""`surgeon inspect` and the report behind it; the CLI's exit codes and its one error formatter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_error, invoke
from torch import nn

import surgeon
from surgeon.masking.inspection import report
from surgeon.models.presets import build


@pytest.fixture
def sparse_folder(tmp_path):
    model = build("tiny-unet")
    p = surgeon.plan(model, sparsity=0.75)
    surgeon.inject(model, p, init="random")
    surgeon.save(model, tmp_path / "sparse")
    return tmp_path / "sparse", p


# --- report ------------------------------------------------------------------------------------------------------


def test_report_on_a_plain_model_measures_dense_weights():
    model = build("tiny-unet")
    rep = report(model, nm="2:4")
    assert rep.rows and all(r.density == 1.0 and r.masked == "" for r in rep.rows)
    assert rep.target_params == sum(r.numel for r in rep.rows) and rep.sparsity == 0.0
    assert rep.model_params == sum(p.numel() for p in model.parameters()) > rep.target_params
    conv_in = next(r for r in rep.rows if r.name == "conv_in.weight")
    assert conv_in.nm_valid is None and "not divisible by M=4" in conv_in.nm_reason
    assert all(r.nm_valid is False for r in rep.rows if r.nm_reason is None)  # random weights have no zeros


def test_report_counts_exact_kept_params_of_a_masked_model():
    model = build("tiny-unet")
    p = surgeon.plan(model, sparsity=0.5)
    surgeon.inject(model, p, init="random")
    rep = report(model)
    assert rep.kept == p.kept
    assert {r.name: r.kept for r in rep.rows} == {f: lp.kept for f, lp in p.layers.items()}


def test_report_density_comes_from_the_mask_not_from_zero_values():
    model = build("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5, distribution="uniform"))
    site = surgeon.masking.surgery.sites(model)["conv_out.weight"]
    with torch.no_grad():
        site.original[site.mask] = 0.0  # kept positions holding zeros are still kept
    row = next(r for r in report(model).rows if r.name == "conv_out.weight")
    assert row.kept == int(site.mask.sum()) and row.masked == "mask"


def test_report_checks_nm_validity_along_the_reduction_dim():
    model = build("tiny-unet")
    p = surgeon.plan(model, nm="2:4")
    surgeon.inject(model, p)
    rep = report(model, nm="2:4")
    assert all(r.nm_valid is True and r.masked == "n:m" for r in rep.rows if r.name in p.layers)
    assert {r.name for r in rep.rows if r.nm_valid is None} == set(p.skipped)
    # a stricter pattern fails on the same weights
    assert all(r.nm_valid is False for r in report(model, nm="1:4").rows if r.name in p.layers)


def test_report_computes_each_nm_mask_once(monkeypatch):
    import surgeon.masking.masks as masks

    model = build("tiny-unet")
    p = surgeon.plan(model, nm="2:4")
    surgeon.inject(model, p)
    calls = []
    real = masks.nm_mask
    monkeypatch.setattr(masks, "nm_mask", lambda w, n, m: calls.append(w.shape) or real(w, n, m))
    rep = report(model, nm="2:4")
    assert len(calls) == len(p.layers) > 0  # once per N:M layer: the count and the check share it
    assert all(r.nm_valid is True for r in rep.rows if r.masked == "n:m")


def test_report_covers_every_gru_weight():
    rnn = nn.Module()
    rnn.gru = nn.GRU(4, 8, 2, bidirectional=True)
    rep = report(rnn)
    assert [r.name for r in rep.rows][:2] == ["gru.weight_ih_l0", "gru.weight_hh_l0"]
    assert len(rep.rows) == 8 and {r.kind for r in rep.rows} == {"rnn"}


# --- the command -------------------------------------------------------------------------------------------------


def test_inspect_prints_a_table_and_totals():
    result = invoke("inspect", "tiny-unet")
    assert result.exit_code == 0, result.output
    assert "conv_in.weight" in result.stdout and "density" in result.stdout
    total = report(build("tiny-unet")).target_params
    assert f"targets: {total:,} params" in result.stdout
    assert "2:4 n/a for conv_in.weight: reduction size 1 is not divisible by M=4" in result.stdout


def test_inspect_json_is_machine_readable_only(sparse_folder):
    folder, p = sparse_folder
    result = invoke("inspect", str(folder), "--json", "--nm", "1:2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["nm"] == "1:2" and data["model"] == str(folder)
    assert data["totals"]["kept"] == p.kept
    assert data["totals"]["target_params"] == p.total
    assert {r["name"] for r in data["rows"]} == set(p.layers)
    assert {r["name"] for r in data["rows"] if r["masked"] == "mask"} == {
        f for f, lp in p.layers.items() if not lp.is_dense
    }


def test_inspect_include_and_exclude_select_rows():
    data = json.loads(
        invoke("inspect", "tiny-unet", "--json", "--include", "down_blocks.*", "--exclude", "*attentions*").stdout
    )
    names = [r["name"] for r in data["rows"]]
    assert names and all(n.startswith("down_blocks.") and "attentions" not in n for n in names)


def test_surgeon_error_exits_1_with_one_error_line_and_a_hint():
    result = invoke("inspect", "no-such-model")
    error, hint = assert_one_error(result, hint=["presets:"])
    assert error == "error: cannot load model no-such-model: not a folder, file.py:Class, preset or hub id"
    assert hint.startswith("hint: presets:") and result.stdout == ""


@pytest.mark.parametrize(
    "args, words",
    [
        (["inspect"], "Missing argument 'REF'"),
        (["inspect", "tiny-unet", "--bogus"], "No such option: --bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_click_usage_errors_exit_2(args, words):
    assert_one_error(invoke(*args), words, hint=["--help"], code=2)


def test_bad_nm_value_is_a_usage_error():
    assert_one_error(invoke("inspect", "tiny-unet", "--nm", "5:4"), "--nm: invalid N:M pattern '5:4'", code=2)


def test_unexpected_exception_is_one_line_unless_debugging(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaput\nsecond line of detail")

    monkeypatch.setattr("surgeon.cli.inspect.report", boom)
    monkeypatch.delenv("SURGEON_DEBUG", raising=False)
    result = invoke("inspect", "tiny-unet")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == "error: RuntimeError: kaput"
    assert "Traceback" not in result.stderr and "second line" not in result.stderr

    monkeypatch.setenv("SURGEON_DEBUG", "1")
    result = invoke("inspect", "tiny-unet")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-2] == "error: RuntimeError: kaput"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"surgeon {surgeon.__version__}"


def test_console_entry_point_exit_code():
    """The installed entry point, in a real process: stderr, exit code, nothing on stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", "from surgeon.cli.app import main; main()", "inspect", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_error(proc, "cannot load model no-such-model")
    assert proc.stdout == ""
