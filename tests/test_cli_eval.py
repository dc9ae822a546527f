"""``surgeon eval``: one table of FID/KID, loss, parameters and FLOPs; bad inputs end in one error + hint."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_error, invoke, write_images


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no Inception weights there
    monkeypatch.delenv("SURGEON_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture
def data(tmp_path):
    write_images(tmp_path / "data" / "train", n=8, seed=0)
    write_images(tmp_path / "data" / "validation", n=8, seed=1)
    return tmp_path / "data"


@pytest.mark.parametrize(
    "args, words, hint, code",
    [
        (["--n", "0"], ["--n 0", "at least 4"], [], 2),
        (["--metrics", "fid,inception-score"], ["unknown metric 'inception-score'"], [], 1),
        (["--extractor", "clip"], ["unknown feature extractor 'clip'"], ["efficientnet-lite0"], 1),
        (["--extractor", "inception-v3-compat"], ["not available offline"], ["--extractor efficientnet-lite0"], 1),
        (["--sample-steps", "0"], ["--sample-steps 0"], [], 2),
        (["--eta", "1.5"], ["--eta 1.5", "[0, 1]"], [], 2),
    ],
)
def test_bad_inputs(tmp_path, data, args, words, hint, code):
    out = tmp_path / "out"
    r = invoke("eval", "tiny-unet", "--data", data, "--out", out, *args)
    assert_one_error(r, *words, hint=hint, code=code)
    assert not out.exists()


def test_too_few_heldout_examples(tmp_path, data):
    for p in list((data / "validation").iterdir())[1:]:
        p.unlink()
    out = tmp_path / "out"
    r = invoke("eval", "tiny-unet", "--data", data, "--out", out, "--n", 4, "--sample-steps", 1, "--no-progress")
    assert_one_error(r, "1 held-out example")
    assert not (out / "results.json").exists()


def test_samples_that_cannot_be_rendered(tmp_path, data):
    from diffusers import UNet2DModel

    folder = tmp_path / "latent-unet"
    UNet2DModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).save_pretrained(folder)
    out = tmp_path / "out"
    r = invoke("eval", folder, "--data", data, "--out", out, "--n", 4, "--no-progress")
    assert_one_error(r, "4 channels and cannot be rendered")
    assert not (out / "results.json").exists()


def test_two_models_one_table_with_the_extractor_named(tmp_path, data):
    import surgeon
    from surgeon.models.presets import build

    sparse = build("tiny-unet")
    surgeon.inject(sparse, surgeon.plan(sparse, sparsity=0.5))
    surgeon.save(sparse, tmp_path / "sparse")
    out = tmp_path / "out"
    r = invoke(
        "eval",
        "tiny-unet",
        tmp_path / "sparse",
        "--data",
        data,
        "--out",
        out,
        "--n",
        6,
        "--sample-steps",
        2,
        "--no-progress",
        "--json",
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["extractor"]["name"] == "efficientnet-lite0"
    assert "not comparable with Inception FID" in result["metric_label"]
    dense, sparse_row = result["models"]
    assert dense["sparsity"] == 0.0 and sparse_row["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sparse_row["flops_forward"] < dense["flops_forward"] == dense["flops_forward_dense"]
    for row in (dense, sparse_row):
        assert row["fid"] > 0 and row["kid_std"] >= 0 and row["kid_subset_size"] == 6 and row["n_reference"] == 8
        assert row["heldout_loss"] > 0 and row["params_kept"] <= row["params_total"]
    for name in ("samples.png", "fid_vs_sparsity.png", "fid_vs_flops.png", "results.json"):
        assert (out / name).stat().st_size > 1000, name
    assert json.loads((out / "results.json").read_text())["models"][1]["fid"] == sparse_row["fid"]
    # the table names the extractor in words; the output folder is not replaced without --force
    r = invoke("eval", "tiny-unet", "--data", data, "--out", out, "--n", 6, "--sample-steps", 2, "--no-progress")
    assert_one_error(r, "exists")
    r = invoke(
        "eval", "tiny-unet", "--data", data, "--out", out, "--n", 6, "--sample-steps", 2, "--no-progress", "--force"
    )
    assert r.exit_code == 0 and "EfficientNet-Lite0 features" in r.stdout and "not comparable" in r.stdout


def test_group_reports_mean_and_std_over_the_seeds_of_one_configuration(tmp_path, data):
    import surgeon
    from surgeon.models.presets import build
    from surgeon.recipe import load_recipe

    for seed in (0, 1):
        model = build("tiny-unet", seed=seed)
        surgeon.inject(model, surgeon.plan(model, sparsity=0.5), seed=seed)
        surgeon.save(model, tmp_path / f"seed-{seed}", recipe=load_recipe("static").override(**{"training.seed": seed}))
    args = ["--data", data, "--n", 6, "--sample-steps", 2, "--no-progress", "--group"]
    r = invoke("eval", tmp_path / "seed-0", tmp_path / "seed-1", *args, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    fids = [m["fid"] for m in result["models"]]
    g = result["group"]
    assert g["models"] == 2 and g["fid"]["values"] == fids and fids[0] != fids[1]
    assert g["fid"]["mean"] == pytest.approx(sum(fids) / 2)
    assert g["fid"]["std"] == pytest.approx(abs(fids[0] - fids[1]) / 2**0.5)
    assert {"kid_mean", "precision", "recall", "heldout_loss"} <= g.keys()
    r = invoke("eval", tmp_path / "seed-0", tmp_path / "seed-1", *args, "--out", tmp_path / "o2")
    assert r.exit_code == 0 and "mean ± std over 2 models: FID" in r.stdout
    # runs of different configurations are not seeds of one: refused, nothing written
    other = build("tiny-unet")
    surgeon.save(other, tmp_path / "other", recipe=load_recipe("static").override(**{"optimizer.lr": 0.1}))
    r = invoke("eval", tmp_path / "seed-0", tmp_path / "other", *args, "--out", tmp_path / "o3")
    assert_one_error(r, "optimizer.lr", "not only in its seed")
    r = invoke("eval", tmp_path / "seed-0", *args, "--out", tmp_path / "o4")
    assert_one_error(r, "--group needs at least 2 models", code=2)
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


def test_precision_recall_need_four_samples(tmp_path, data):
    r = invoke("eval", "tiny-unet", "--data", data, "--n", 3, "--out", tmp_path / "o", "--no-progress")
    assert_one_error(r, "--n 3", "PR", "at least 4", code=2)
    assert not (tmp_path / "o").exists()


def test_the_recorded_eta_is_used_and_eta_overrides_it(tmp_path, data):
    import surgeon
    from surgeon.models.presets import build
    from surgeon.recipe import load_recipe

    surgeon.save(build("tiny-unet"), tmp_path / "m", recipe=load_recipe("dense").override(**{"diffusion.eta": 1.0}))
    args = ["--data", data, "--n", 4, "--sample-steps", 2, "--metrics", "kid", "--no-progress", "--json"]
    rows = []
    for extra in ([], ["--eta", "0"]):
        r = invoke("eval", tmp_path / "m", *args, *extra, "--out", tmp_path / f"o{len(extra)}")
        assert r.exit_code == 0, r.output
        rows.append(json.loads(r.stdout)["models"][0])
    assert rows[0]["eta"] == 1.0 and rows[1]["eta"] == 0.0
    assert rows[0]["kid_mean"] != rows[1]["kid_mean"]  # η's noise changed the samples
