"""ChiroDiffNet and SequenceTask on small synthetic strokes (lines and circles), independent of surgeon.data."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from surgeon.errors import SurgeonError
from surgeon.masking.plan import plan
from surgeon.masking.surgery import inject, sites
from surgeon.masking.targets import find_targets
from surgeon.models import ChiroDiffNet
from surgeon.tasks.base import Task
from surgeon.tasks.sequences import SequenceTask


def _shape(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """One synthetic glyph [n, 3]: a circle (one stroke) or a cross of two lines (two strokes), pen=1 on stroke ends."""
    u = torch.rand(4, generator=gen)
    if kind == "circle":
        a = torch.linspace(0, 2 * math.pi, n)
        r = 0.3 + 0.5 * u[0]
        xy = torch.stack([r * a.cos() + 0.2 * (u[1] - 0.5), r * a.sin() + 0.2 * (u[2] - 0.5)], -1)
        pen = torch.zeros(n)
        pen[-1] = 1
    else:
        h = n // 2
        s = torch.linspace(-0.8, 0.8, h)
        t = torch.linspace(-0.8, 0.8, n - h)
        xy = torch.cat([torch.stack([s, s * (u[0] - 0.5)], -1), torch.stack([t * (u[1] - 0.5), t], -1)])
        pen = torch.zeros(n)
        pen[h - 1] = pen[-1] = 1
    return torch.cat([xy + 0.02 * torch.randn(n, 2, generator=gen), pen[:, None]], -1)


def _batch(seqs: list[torch.Tensor]) -> dict:
    L = max(len(s) for s in seqs)  # noqa: N806
    points = torch.zeros(len(seqs), L, 3)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        points[i, : len(s)], mask[i, : len(s)] = s, True
    return {"points": points, "mask": mask}


def _data(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 20, (count,), generator=gen)
    return [_shape("circle" if i % 2 else "cross", int(n), gen) for i, n in enumerate(lengths)]


def _tiny(**kw) -> ChiroDiffNet:
    torch.manual_seed(0)
    return ChiroDiffNet(hidden=16, layers=2, **kw)


def test_forward_shapes_and_zero_padding():
    model = _tiny()
    batch = _batch(_data(5))
    out = model(batch["points"], torch.tensor([0, 10, 500, 998, 999]), batch["mask"])
    assert out.shape == batch["points"].shape
    assert torch.isfinite(out).all()
    assert (out[~batch["mask"]] == 0).all()
    assert (out[batch["mask"]].abs().sum(-1) > 0).all()


def test_padding_never_reaches_real_points_or_the_loss():
    task, model = SequenceTask(), _tiny()
    batch = _batch(_data(6))
    inputs, eps, weight = task.noisy_batch(batch, torch.Generator().manual_seed(1))
    out = task.predict(model, inputs)
    loss = Task.mse(out, eps, weight)

    pad = ~inputs["mask"]
    assert pad.any()
    garbage = {**inputs, "x_t": inputs["x_t"].masked_fill(pad[..., None], 1e3)}
    out2 = task.predict(model, garbage)
    loss2 = Task.mse(out2, eps.masked_fill(pad[..., None], -7.0), weight)

    real = inputs["mask"]
    torch.testing.assert_close(out2[real], out[real], rtol=0, atol=0)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_backbone_is_exactly_a_packed_bidirectional_gru():
    model = _tiny()
    H, n_layers = model.config["hidden"], model.config["layers"]  # noqa: N806
    ref = torch.nn.GRU(model.rnn[0].fwd.input_size, H, n_layers, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for i, layer in enumerate(model.rnn):
            for suffix, gru in (("", layer.fwd), ("_reverse", layer.bwd)):
                for name, p in gru.named_parameters():
                    getattr(ref, name.replace("_l0", f"_l{i}") + suffix).copy_(p)
    batch = _batch(_data(5))
    x, mask = batch["points"], batch["mask"]
    t = torch.tensor([0, 9, 99, 499, 999])
    temb = model.time_embedding(t)[:, None, :].expand(-1, x.shape[1], -1)
    inp = torch.cat([x, model.velocities(x), temb], -1)
    packed = pack_padded_sequence(inp, mask.sum(1), batch_first=True, enforce_sorted=False)
    hid, _ = pad_packed_sequence(ref(packed)[0], batch_first=True, total_length=x.shape[1])
    expected = model.head(torch.cat([model.out_proj(hid), temb], -1))
    torch.testing.assert_close(model(x, t, mask)[mask], expected[mask])


def test_noisy_batch_follows_the_ddpm_marginal():
    task = SequenceTask()
    batch = _batch(_data(4))
    inputs, eps, weight = task.noisy_batch(batch, torch.Generator().manual_seed(0))
    abar = task.scheduler.alphas_cumprod[inputs["t"]][:, None, None]
    torch.testing.assert_close(inputs["x_t"], abar.sqrt() * batch["points"] + (1 - abar).sqrt() * eps)
    assert ((inputs["t"] >= 0) & (inputs["t"] < 1000)).all()
    assert torch.equal(weight[..., 0], batch["mask"])


def test_every_gru_weight_is_a_target_and_masks_act_in_the_forward():
    model = ChiroDiffNet(hidden=16, layers=3)
    found = find_targets(model)
    gru = {f"rnn.{i}.{d}.weight_{k}_l0" for k in ("ih", "hh") for i in range(3) for d in ("fwd", "bwd")}
    assert gru <= set(found)
    assert all(found[f].kind == "rnn" for f in gru)

    dense = copy.deepcopy(model)
    inject(model, plan(model, sparsity=0.9))
    masked = sites(model)
    assert gru <= set(masked)
    with torch.no_grad():
        for fqn, site in masked.items():
            dense.get_parameter(fqn).mul_(site.mask)
    batch = _batch(_data(3))
    t = torch.tensor([3, 300, 900])
    torch.testing.assert_close(model(batch["points"], t, batch["mask"]), dense(batch["points"], t, batch["mask"]))
    sparse_hh = dense.rnn[2].bwd.weight_hh_l0
    assert (sparse_hh == 0).float().mean() > 0.5


def test_fifty_adamw_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ChiroDiffNet(hidden=32, layers=2)
    task = SequenceTask()
    data = _data(64, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        idx = torch.randint(0, len(data), (16,), generator=gen)
        inputs, eps, weight = task.noisy_batch(_batch([data[i] for i in idx]), gen)
        loss = Task.mse(task.predict(model, inputs), eps, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_returns_finite_padded_sequences(sampler):
    task, model = SequenceTask(), _tiny()
    out = task.sample(model, 3, torch.Generator().manual_seed(0), steps=4, lengths=[4, 9, 7], sampler=sampler)
    assert out["points"].shape == (3, 9, 3)
    assert out["mask"].sum(1).tolist() == [4, 9, 7]
    assert torch.isfinite(out["points"]).all()
    assert (out["points"][~out["mask"]] == 0).all()
    assert model.training  # sampling restores the mode it found


def test_ddim_sampling_is_seeded():
    task, model = SequenceTask(), _tiny()
    a = task.sample(model, 2, torch.Generator().manual_seed(5), steps=3, lengths=6)
    b = task.sample(model, 2, torch.Generator().manual_seed(5), steps=3, lengths=6)
    assert torch.equal(a["points"], b["points"])


def test_sample_lengths_follow_the_training_set_else_a_fixed_length(monkeypatch):
    model = _tiny()
    train = [torch.zeros(5, 3), torch.zeros(11, 3)]
    fake = types.SimpleNamespace(resolve_sequence_data=lambda spec, split, limit, max_points: train)
    monkeypatch.setitem(sys.modules, "surgeon.data", fake)
    task = SequenceTask(data="fake")
    assert task.dataset("train") is train
    out = task.sample(model, 8, torch.Generator().manual_seed(0), steps=2)
    assert set(out["mask"].sum(1).tolist()) <= {5, 11}

    fixed = SequenceTask(max_points=12).sample(model, 2, torch.Generator().manual_seed(0), steps=2)
    assert fixed["mask"].all() and fixed["mask"].shape == (2, 12)


def test_bad_sampling_options_raise_surgeon_errors():
    task, model = SequenceTask(), _tiny()
    with pytest.raises(SurgeonError, match="n=0"):
        task.sample(model, 0)
    with pytest.raises(SurgeonError, match="sampler"):
        task.sample(model, 2, sampler="euler")
    with pytest.raises(SurgeonError, match="lengths"):
        task.sample(model, 2, lengths=[3, 0])
    with pytest.raises(SurgeonError, match="steps"):
        task.sample(model, 2, steps=5000)
    with pytest.raises(SurgeonError, match="steps"):
        task.sample(model, 2, steps=0)


def test_to_images_thresholds_pen_and_drops_padding(monkeypatch):
    seen = []

    def render_sequence(seq, size):
        seen.append(seq)
        return torch.full((size, size), len(seq), dtype=torch.uint8)

    monkeypatch.setitem(sys.modules, "surgeon.data.render", types.SimpleNamespace(render_sequence=render_sequence))
    samples = _batch([torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.7]]), torch.tensor([[0.0, 0.0, 0.9]])])
    images = SequenceTask(image_size=8).to_images(samples)
    assert images.shape == (2, 8, 8, 1) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [2, 1]
    assert seen[0][:, 2].tolist() == [0.0, 1.0] and seen[1][:, 2].tolist() == [1.0]


def test_config_round_trip_rebuilds_a_state_dict_compatible_model():
    model = ChiroDiffNet(hidden=24, layers=2, time_features=6, seed=3)
    config = json.loads(json.dumps(model.config))
    clone = ChiroDiffNet.from_config(config)
    assert clone.config == model.config
    assert torch.equal(clone.fourier_freqs, model.fourier_freqs)  # seeded: no state_dict needed for it
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    clone.load_state_dict(model.state_dict(), strict=True)
    batch = _batch(_data(2))
    t = torch.tensor([1, 700])
    assert torch.equal(clone(batch["points"], t, batch["mask"]), model(batch["points"], t, batch["mask"]))


def test_bad_configs_and_inputs_raise_surgeon_errors():
    with pytest.raises(SurgeonError, match="config"):
        ChiroDiffNet.from_config({"hidden": 8, "heads": 2})
    with pytest.raises(SurgeonError, match="time_features"):
        ChiroDiffNet(time_features=5)
    model = _tiny()
    with pytest.raises(SurgeonError, match="x_t"):
        model(torch.zeros(2, 4, 2), torch.zeros(2, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    holes = torch.tensor([[True, False, True, False]] * 2)
    with pytest.raises(SurgeonError, match="prefix"):
        model(torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long), holes)
