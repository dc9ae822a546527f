"""find_targets: which weight tensors are sparsification targets (docs/methods.md, first paragraph)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.masking.plan import plan
from surgeon.masking.surgery import inject, sites
from surgeon.masking.targets import find_targets

TINY_PRESETS = ("tiny-unet", "tiny-unet-cond", "tiny-unet1d", "tiny-dit")


class MyLinear(nn.Linear):
    """Stands in for diffusers-style subclasses of the stock layers."""


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.randn(1, 5, 4))  # a learned positional embedding
        self.register_buffer("sincos", torch.randn(1, 5, 4))  # a fixed one
        self.lin = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.c1 = nn.Conv1d(2, 4, 3)
        self.c2 = nn.Conv2d(2, 4, (3, 2))
        self.gn = nn.GroupNorm(2, 4)
        self.c3 = nn.Conv3d(2, 4, 1, bias=False)
        self.sub = MyLinear(6, 3)
        self.head = nn.Sequential(nn.Linear(3, 2), nn.SiLU())


ZOO_EXPECTED = ["lin.weight", "c1.weight", "c2.weight", "c3.weight", "sub.weight", "head.0.weight"]
ZOO_KIND = {
    "lin.weight": "linear",
    "sub.weight": "linear",
    "head.0.weight": "linear",
    "c1.weight": "conv",
    "c2.weight": "conv",
    "c3.weight": "conv",
}


def _rnn_names(num_layers: int, bidirectional: bool) -> list[str]:
    out = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse") if bidirectional else ("",):
            out += [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
    return out


def _param_order(model: nn.Module, names) -> list[str]:
    names = set(names)
    return [n for n, _ in model.named_parameters() if n in names]


def test_zoo_targets_exact_set_kinds_shapes_and_order():
    model = Zoo()
    found = find_targets(model)
    assert list(found) == _param_order(model, ZOO_EXPECTED)
    assert set(found) == set(ZOO_EXPECTED)
    params = dict(model.named_parameters())
    for fqn, t in found.items():
        assert t.kind == ZOO_KIND[fqn]
        assert t.shape == tuple(params[fqn].shape)
        assert t.fqn == fqn and f"{t.module_name}.{t.tensor_name}" == fqn
        assert getattr(t.module, t.tensor_name) is params[fqn]
        assert t.numel == params[fqn].numel()
    # nothing that is a bias, a norm, an embedding or a positional embedding
    for fqn in found:
        assert not fqn.endswith("bias")
        assert not fqn.startswith(("emb.", "ln.", "gn.", "pos", "sincos"))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM, nn.RNN])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True), (3, False)])
def test_rnn_every_layer_and_direction(cls, num_layers, bidirectional):
    model = nn.Sequential(nn.Linear(3, 5), cls(5, 4, num_layers=num_layers, bidirectional=bidirectional))
    found = find_targets(model)
    expected = ["0.weight"] + [f"1.{n}" for n in _rnn_names(num_layers, bidirectional)]
    assert list(found) == _param_order(model, expected)
    assert set(found) == set(expected)
    gates = {nn.GRU: 3, nn.LSTM: 4, nn.RNN: 1}[cls]
    for fqn, t in found.items():
        if fqn == "0.weight":
            continue
        assert t.kind == "rnn"
        layer = int(fqn.split("_l")[1][0])
        n_in = 4 if "_hh_" in fqn else (5 if layer == 0 else 4 * (2 if bidirectional else 1))
        assert t.shape == (gates * 4, n_in)
        assert t.fan_in_out == (n_in, gates * 4, ())


def test_rnn_biases_never_targets():
    gru = nn.GRU(4, 4, num_layers=2, bidirectional=True)
    found = find_targets(gru)
    assert len(found) == 8
    assert not any("bias" in k for k in found)


def _expected_for(model: nn.Module) -> list[str]:
    """Independent oracle: every Linear/Conv{1,2,3}d weight and every RNN weight_ih/hh tensor."""
    out = []
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out.append(prefix + "weight")
        elif isinstance(mod, nn.RNNBase):
            out += [prefix + n for n in _rnn_names(mod.num_layers, mod.bidirectional)]
    return out


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_presets_targets_match_oracle(name, build_preset):
    model = build_preset(name)
    found = find_targets(model)
    expected = _expected_for(model)
    assert expected, "the oracle found nothing: the preset is not what this test assumes"
    assert list(found) == _param_order(model, expected)
    excluded_modules = {
        mname for mname, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.GroupNorm, nn.LayerNorm))
    }
    for t in found.values():
        assert t.module_name not in excluded_modules
        assert t.tensor_name == "weight"
    if name == "tiny-dit":
        # a class-label nn.Embedding and a sin-cos positional embedding buffer exist, and are never targets
        assert any(isinstance(m, nn.Embedding) for m in model.modules())
        assert "pos_embed.pos_embed" in dict(model.named_buffers())
        assert not any("embedding_table" in k or k.endswith("pos_embed.pos_embed") for k in found)
        assert "pos_embed.proj.weight" in found  # the patchify conv is a conv like any other


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_targets_still_listed_after_injection(name, build_preset):
    model = build_preset(name)
    before = find_targets(model)
    inject(model, plan(model, sparsity=0.5, distribution="uniform"), init="random")
    assert set(sites(model)) == set(before)
    after = find_targets(model)
    assert list(after) == list(before)
    for fqn in before:
        assert (after[fqn].kind, after[fqn].shape, after[fqn].module_name) == (
            before[fqn].kind,
            before[fqn].shape,
            before[fqn].module_name,
        )


def test_rnn_targets_still_listed_after_injection():
    model = nn.Sequential(nn.GRU(4, 8, num_layers=2, bidirectional=True), nn.LSTM(16, 4))
    before = find_targets(model)
    inject(model, plan(model, sparsity=0.5, distribution="uniform"), init="random")
    after = find_targets(model)
    assert list(after) == list(before)
    assert len(after) == 8 + 2
    assert all(t.kind == "rnn" for t in after.values())


# ---------------------------------------------------------------- include / exclude


@pytest.fixture(scope="module")
def unet():
    from surgeon.models import presets

    return presets.build("tiny-unet")


def test_include_glob_matches_module_name_or_fqn(unet):
    every = find_targets(unet)
    to_q = find_targets(unet, include=["*.to_q"])  # module name
    assert set(to_q) == {k for k in every if k.endswith(".to_q.weight")} and len(to_q) == 4
    assert set(find_targets(unet, include=["*.to_q.weight"])) == set(to_q)  # tensor FQN
    assert set(find_targets(unet, include=["conv_in"])) == {"conv_in.weight"}
    # globs are anchored: a bare fragment matches nothing
    assert find_targets(unet, include=["conv"]) == {}
    down = find_targets(unet, include=["down_blocks.*"])
    assert set(down) == {k for k in every if k.startswith("down_blocks.")}
    both = find_targets(unet, include=["conv_in", "conv_out"])
    assert set(both) == {"conv_in.weight", "conv_out.weight"}


def test_exclude_glob_and_include_exclude_combined(unet):
    every = find_targets(unet)
    no_attn = find_targets(unet, exclude=["*attentions*"])
    assert set(no_attn) == {k for k in every if "attentions" not in k}
    attn_no_k = find_targets(unet, include=["*attentions*"], exclude=["*.to_k"])
    assert set(attn_no_k) == {k for k in every if "attentions" in k and not k.endswith("to_k.weight")}
    assert list(no_attn) == [k for k in every if k in no_attn]  # order preserved


def test_regex_patterns_are_searched_not_anchored(unet):
    every = find_targets(unet)
    convs = find_targets(unet, include=[r"re:resnets\.\d+\.conv[12]"])
    assert set(convs) == {k for k in every if ".resnets." in k and k.endswith((".conv1.weight", ".conv2.weight"))}
    assert convs
    not_up = find_targets(unet, exclude=["re:^up_blocks"])
    assert set(not_up) == {k for k in every if not k.startswith("up_blocks")}
    mixed = find_targets(unet, include=["re:to_[qk]$", "conv_out"])
    assert set(mixed) == {k for k in every if k.endswith((".to_q.weight", ".to_k.weight"))} | {"conv_out.weight"}


def test_invalid_regex_is_a_surgeon_error(unet):
    with pytest.raises(SurgeonError):
        find_targets(unet, include=["re:("])
    with pytest.raises(SurgeonError):
        find_targets(unet, exclude=["re:[a-"])


def test_dense_first_and_last_drop_first_and_last_modules(unet):
    every = list(find_targets(unet))
    assert every[0] == "conv_in.weight" and every[-1] == "conv_out.weight"
    assert list(find_targets(unet, dense_first=True)) == every[1:]
    assert list(find_targets(unet, dense_last=True)) == every[:-1]
    assert list(find_targets(unet, dense_first=True, dense_last=True)) == every[1:-1]
    # applied after include: the first/last *selected* module
    attn = list(find_targets(unet, include=["*attentions*"]))
    assert list(find_targets(unet, include=["*attentions*"], dense_first=True, dense_last=True)) == attn[1:-1]


def test_dense_first_drops_every_tensor_of_a_first_rnn_module():
    model = nn.Sequential(nn.GRU(4, 4, num_layers=2, bidirectional=True), nn.Linear(8, 3), nn.LSTM(3, 2))
    every = list(find_targets(model))
    assert len(every) == 8 + 1 + 2
    assert list(find_targets(model, dense_first=True)) == every[8:]
    assert list(find_targets(model, dense_last=True)) == every[:9]


def test_no_targets_when_nothing_matches():
    assert find_targets(nn.Sequential(nn.LayerNorm(3), nn.Embedding(4, 3))) == {}
    with pytest.raises(SurgeonError):
        plan(nn.Sequential(nn.LayerNorm(3), nn.Embedding(4, 3)), sparsity=0.5)
