"""The one training loop: data order, optimizer set-up and state fix-ups, logs, checkpoints, early stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_train import SyntheticImageTask, masks_of, one_thread, small_recipe, state_of, tiny_model  # noqa: F401
from torch import nn

import surgeon
from surgeon.errors import SurgeonError
from surgeon.masking.measure import measure
from surgeon.masking.surgery import get_plan, sites
from surgeon.training import checkpoint as ckpt
from surgeon.training.loop import BatchSampler, heldout_loss, make_optimizer, train, zero_optimizer_state


# ------------------------------------------------------------------------------------------------ BatchSampler
def test_batch_sampler_epochs_are_permutations_and_ranks_split_each_batch():
    n, b = 10, 4
    single = BatchSampler(n, b, seed=3)
    stream = [i for step in range(5) for i in single.indices(step)]  # 20 positions = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch has its own order
    ranks = [BatchSampler(n, b, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(5):
        parts = [r.indices(step) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == b // 2
        assert sorted(parts[0] + parts[1]) == sorted(single.indices(step))  # the shards make up the global batch
    # a pure function of (seed, step): a fresh sampler (e.g. after resume) gives the same batch at any step
    assert BatchSampler(n, b, seed=3).indices(4) == single.indices(4)
    assert BatchSampler(n, b, seed=4).indices(0) != single.indices(0)


def test_batch_sampler_rejects_bad_shapes():
    with pytest.raises(SurgeonError, match="empty"):
        BatchSampler(0, 4, seed=0)
    with pytest.raises(SurgeonError, match="divisible"):
        BatchSampler(10, 3, seed=0, world=2)


# ------------------------------------------------------------------------------------------------- optimizer
def test_make_optimizer_is_adamw_with_the_recipe_settings():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)
    recipe = small_recipe(
        "rigl", **{"optimizer.lr": 3e-3, "optimizer.weight_decay": 0.02, "optimizer.betas": [0.8, 0.95]}
    )
    opt, names = make_optimizer(model, recipe)
    assert isinstance(opt, torch.optim.AdamW)
    assert names == ["0.weight", "0.bias", "1.weight"]  # trainable parameters only
    (group,) = opt.param_groups
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.02 and tuple(group["betas"]) == (0.8, 0.95)
    assert [id(p) for p in group["params"]] == [id(p) for n, p in model.named_parameters() if p.requires_grad]
    assert group["fused"] is True  # one kernel per tensor on CPU: the per-op path is ~3x slower, slower yet on zeros


def test_fused_adamw_keeps_pruned_weights_and_their_moments_at_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    surgeon.inject(model, surgeon.plan(model, sparsity=0.75), init="random")
    opt, _ = make_optimizer(model, small_recipe("static", **{"optimizer.weight_decay": 0.1}))
    masked = sites(model)
    for _ in range(5):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for site in masked.values():
        pruned = ~site.mask
        assert pruned.any() and not site.original[pruned].any()
        state = opt.state[site.original]
        assert not state["exp_avg"][pruned].any() and not state["exp_avg_sq"][pruned].any()
        assert state["exp_avg_sq"][site.mask].any()  # the kept ones did train


def test_zero_optimizer_state_zeroes_every_moment_at_positions_only():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(2):
        lin(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    before = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    bias_before = {k: v.clone() for k, v in opt.state[lin.bias].items()}
    pos = torch.zeros(3, 4, dtype=torch.bool)
    pos[0, 1] = pos[2, 3] = pos[1, 0] = True
    zero_optimizer_state(opt, lin.weight, pos)
    state = opt.state[lin.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(before[key][pos] != 0)  # there was something to zero
        assert torch.all(state[key][pos] == 0)
        assert torch.equal(state[key][~pos], before[key][~pos])
    assert torch.equal(state["step"], before["step"])  # scalars untouched
    assert all(torch.equal(opt.state[lin.bias][k], v) for k, v in bias_before.items())  # other parameters untouched


# ------------------------------------------------------------------------------------------------------ loop
def test_rigl_run_logs_updates_until_the_stop_step_and_keeps_checkpoints(tmp_path):
    recipe = small_recipe(
        "rigl",
        **{
            "training.steps": 12,
            "dst.delta_t": 3,
            "dst.stop_fraction": 0.75,
            "dst.p": 0.4,
            "dst.p_decay": "cosine",
            "training.checkpoint_every": 2,
            "training.keep_checkpoints": 2,
            "training.log_every": 4,
        },
    )
    model = tiny_model(recipe)
    result = train(model, SyntheticImageTask(model), recipe, tmp_path, progress=False)
    assert result.steps == 12 and math.isfinite(result.final_loss) and result.val_loss is not None
    # updates every ΔT_e = 3 steps up to the stop step 0.75·12 = 9; p decays as ½(1 + cos(π·step/9))
    assert [u["step"] for u in result.mask_updates] == [3, 6, 9]
    for u in result.mask_updates:
        assert u["p"] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * u["step"] / 9)))
    assert result.mask_updates[-1]["regrown"] == 0  # p reached 0 at the stop step
    assert result.mask_updates[0]["regrown"] > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 8, 12]
    # the log records every update that moved weights (at the stop step p has decayed to 0)
    assert [r["step"] for r in records if "mask_update" in r] == [3, 6]
    assert [r["mask_update"] for r in records if "mask_update" in r] == result.mask_updates[:2]
    for r in records:
        if "loss" in r:
            assert math.isfinite(r["loss"]) and r["sparsity"] == pytest.approx(measure(model).sparsity)
    # checkpoints every 2 steps (never at the last step), only the newest 2 kept
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [
        "step-0000008.safetensors",
        "step-0000010.safetensors",
    ]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_sparsity_is_exact_and_pruned_weights_stay_zero_with_grad_accum(tmp_path):
    recipe = small_recipe(
        "magran", **{"training.steps": 4, "training.grad_accum": 2, "dst.delta_t": 2, "training.batch_size": 2}
    )
    model = tiny_model(recipe)
    planned = {f: int(m.sum()) for f, m in masks_of(model).items()}
    train(model, SyntheticImageTask(model), recipe, tmp_path, progress=False)
    # over every planned target: layers the ERK budget left dense count as fully kept
    layers = get_plan(model).layers
    kept = sum(planned.get(f, lp.numel) for f, lp in layers.items())
    assert measure(model).sparsity == pytest.approx(1 - kept / sum(lp.numel for lp in layers.values()))
    assert measure(model).sparsity == pytest.approx(0.5, abs=1e-3)  # the recipe's global S
    for fqn, site in sites(model).items():
        assert int(site.mask.sum()) == planned[fqn]
        assert torch.all(site.effective().detach()[~site.mask] == 0)


def test_same_seed_same_run_and_stop_after(tmp_path):
    recipe = small_recipe("rigl", **{"training.steps": 6, "dst.delta_t": 2})
    runs = []
    for i, stop in enumerate((None, None, 3)):
        model = tiny_model(recipe)
        result = train(model, SyntheticImageTask(model), recipe, tmp_path / f"run{i}", progress=False, stop_after=stop)
        runs.append((result, state_of(model)))
    (r0, s0), (r1, s1), (r2, s2) = runs
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert r2.steps == 3 and [u["step"] for u in r2.mask_updates] == [2]
    assert any(not torch.equal(s0[k], s2[k]) for k in s0)  # three more steps do change things
    other = small_recipe("rigl", **{"training.steps": 6, "dst.delta_t": 2, "training.seed": 1})
    model = tiny_model(other)
    train(model, SyntheticImageTask(model), other, tmp_path / "seed1", progress=False)
    assert any(not torch.equal(s0[k], v) for k, v in state_of(model).items())


def test_dense_recipe_trains_without_masks(tmp_path):
    recipe = small_recipe("dense", **{"training.steps": 3})
    model = tiny_model(recipe)
    assert sites(model) == {}
    before = state_of(model)
    result = train(model, SyntheticImageTask(model), recipe, tmp_path, progress=False)
    assert result.mask_updates == [] and measure(model).sparsity == 0.0
    assert any(not torch.equal(before[k], v) for k, v in state_of(model).items())


def test_heldout_loss_uses_fixed_noise():
    recipe = small_recipe("static")
    model = tiny_model(recipe)
    task = SyntheticImageTask(model)
    from surgeon.training.objectives import EpsilonLoss

    loss = EpsilonLoss(task)
    a = heldout_loss(model, task, loss, batch_size=4, batches=2, seed=0)
    b = heldout_loss(model, task, loss, batch_size=4, batches=2, seed=0)
    c = heldout_loss(model, task, loss, batch_size=4, batches=2, seed=1)
    assert a == b and a != c and model.training
