"""ChiroDiff through ``surgeon sparsify``: RigL keeps every GRU weight exactly sparse on real KanjiVG strokes;
bad models and a missing ``kanjivg`` package end in one ``error:`` + ``hint:`` with nothing written; a user's
``file.py:Class`` with ChiroDiff's ``forward(x_t, t, mask)`` trains like the built-in network.

Every test points SURGEON_CACHE at a temporary folder (shared by this module, so strokes are parsed once).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from helpers import USER_MODULE, assert_one_error, invoke
from helpers_train import one_thread  # noqa: F401
from PIL import Image
from torch import nn

import surgeon
from surgeon.algorithms.dst import MagRan
from surgeon.data import cache, kanjivg
from surgeon.masking.surgery import get_plan, sites

STEPS, DELTA_T = 6, 2  # updates after steps 2, 4 and 6 (stop fraction 1.0)
RECIPE = f"""\
algorithm: rigl
sparsity: 0.5
distribution: erk
init: scratch
dst: {{delta_t: {DELTA_T}, p: 0.3, p_decay: constant, stop_fraction: 1.0}}
optimizer: {{lr: 1.0e-3}}
diffusion: {{sample_steps: 2}}
training: {{steps: {STEPS}, batch_size: 8, log_every: 1, checkpoint_every: 1000, eval_batches: 1, num_samples: 4}}
"""


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("kanjivg-cache")


@pytest.fixture(autouse=True)
def _isolated(cache_root, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(cache_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny-rigl.yaml"
    path.write_text(RECIPE)
    return path


def gru_weights(model: nn.Module) -> set[str]:
    """FQNs of every weight_ih/weight_hh tensor of every GRU/LSTM in ``model`` (all layers, both directions)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase):
            out |= {f"{name}.{w}" for w in m._flat_weights_names if w.startswith(("weight_ih", "weight_hh"))}
    return out


@pytest.fixture
def update_log(monkeypatch):
    """Per-tensor kept counts and the largest |effective weight| at pruned positions after every mask update."""
    log = []
    real = MagRan.after_optimizer_step

    def spy(self, step):
        resets = real(self, step)
        if resets:
            log.append(
                {
                    "step": step,
                    "kept": {f: int(s.mask.sum()) for f, s in self.sites.items()},
                    "pruned_max": {
                        f: float(s.effective().detach()[~s.mask].abs().max()) for f, s in self.sites.items()
                    },
                    "masks": {f: s.mask.clone() for f, s in self.sites.items()},
                }
            )
        return resets

    monkeypatch.setattr(MagRan, "after_optimizer_step", spy)
    return log


def check_exactly_sparse(out, update_log, expect_grus: int) -> nn.Module:
    """The saved model and every mask update keep each GRU tensor at the plan's count, pruned entries exactly 0."""
    loaded = surgeon.load(out / "model", trust_code=True)  # a user module's folder names its file
    plan, masked = get_plan(loaded), sites(loaded)
    grus = gru_weights(loaded)
    assert len(grus) == expect_grus and grus <= masked.keys()
    for fqn in grus:
        kept = plan.layers[fqn].kept
        assert 0 < kept < masked[fqn].mask.numel(), fqn  # really sparse, not left dense by the budget
        assert int(masked[fqn].mask.sum()) == kept, fqn
        module_name, _, tensor = fqn.rpartition(".")
        weight = getattr(loaded.get_submodule(module_name), tensor)  # what the forward uses
        assert torch.count_nonzero(weight[~masked[fqn].mask]) == 0, fqn

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r["mask_update"] for r in records if "mask_update" in r]
    assert [u["step"] for u in updates] == list(range(DELTA_T, STEPS + 1, DELTA_T))
    assert all(u["regrown"] > 0 for u in updates)  # masks really moved
    assert [u["step"] for u in update_log] == [u["step"] for u in updates]
    for u in update_log:
        assert all(u["kept"][f] == plan.layers[f].kept for f in grus), u["step"]
        assert all(u["pruned_max"][f] == 0.0 for f in grus), u["step"]
    assert any(not torch.equal(update_log[0]["masks"][f], update_log[-1]["masks"][f]) for f in grus)
    assert all(torch.equal(update_log[-1]["masks"][f], masked[f].mask) for f in masked)  # saved = trained
    with Image.open(out / "samples.png") as im:
        im.load()
        assert min(im.size) >= 64
    return loaded


def test_tiny_chirodiff_rigl_keeps_every_gru_weight_exactly_sparse(tmp_path, recipe, update_log):
    out = tmp_path / "run"
    r = invoke(
        "sparsify",
        "tiny-chirodiff",
        "--data",
        "kanjivg",
        "--recipe",
        recipe,
        "--s",
        0.5,
        "--steps",
        STEPS,
        "--limit",
        64,
        "-b",
        8,
        "--delta-t",
        DELTA_T,
        "--out",
        out,
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    loaded = check_exactly_sparse(out, update_log, expect_grus=8)  # 2 layers x 2 directions x (ih, hh)
    assert type(loaded).__name__ == "ChiroDiffNet"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["sparsity"] == pytest.approx(0.5, abs=2e-3)
    assert summary["val_loss"] is not None


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_denoiser.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    return path


def test_user_module_with_chirodiffs_forward_trains_through_the_cli(tmp_path, recipe, user_file, update_log):
    out = tmp_path / "run"
    r = invoke(
        "sparsify",
        f"{user_file}:StrokeGRU",
        "--data",
        "kanjivg",
        "--recipe",
        recipe,
        "--steps",
        STEPS,
        "--limit",
        32,
        "-b",
        8,
        "--out",
        out,
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    loaded = check_exactly_sparse(out, update_log, expect_grus=8)  # nn.GRU: l0, l1, l0_reverse, l1_reverse
    assert type(loaded).__name__ == "StrokeGRU"
    assert {f for f in gru_weights(loaded) if f.endswith("_reverse")} == {
        "rnn.weight_ih_l0_reverse",
        "rnn.weight_hh_l0_reverse",
        "rnn.weight_ih_l1_reverse",
        "rnn.weight_hh_l1_reverse",
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in records if "loss" in rec)


@pytest.mark.parametrize(
    "ref, words, hint",
    [
        ("{dir}/absent.py:StrokeGRU", ["absent.py does not exist"], ["path/to/file.py:Class"]),
        ("{file}:NoSuchNet", ["has no class NoSuchNet"], []),
        ("{file}:Plain", ["cannot tell what Plain denoises"], ["forward(x_t, t, mask)"]),
    ],
)
def test_bad_user_modules(tmp_path, recipe, user_file, ref, words, hint):
    out = tmp_path / "run"
    r = invoke(
        "sparsify",
        ref.format(dir=tmp_path, file=user_file),
        "--data",
        "kanjivg",
        "--recipe",
        recipe,
        "--steps",
        2,
        "--limit",
        8,
        "--out",
        out,
        "--no-progress",
    )
    assert_one_error(r, *words, hint=hint)
    assert not out.exists()


def test_missing_kanjivg_package(tmp_path, recipe, monkeypatch):
    monkeypatch.setattr(kanjivg, "find_distribution", lambda: None)
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    r = invoke(
        "sparsify",
        "tiny-chirodiff",
        "--data",
        "kanjivg",
        "--recipe",
        recipe,
        "--steps",
        2,
        "--limit",
        8,
        "--out",
        out,
        "--no-progress",
    )
    assert_one_error(r, "kanjivg", hint=["pip install kanjivg"])
    assert not out.exists()
