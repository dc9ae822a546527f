"""Packed safetensors: exact round trips, the bit layout, the byte budget, and one-line errors that write nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import surgeon
from surgeon import SurgeonError
from surgeon.io.bitpack import kept_values, pack_mask, unpack_mask
from surgeon.io.container import digests, read_metadata
from surgeon.masking.surgery import get_plan, sites
from surgeon.models.presets import build


class BiGRUNet(nn.Module):
    """A custom (non-diffusers) module that records its init arguments, as ChiroDiffNet does."""

    def __init__(self, features: int = 3, hidden: int = 8, layers: int = 2):
        super().__init__()
        self.config = {"features": features, "hidden": hidden, "layers": layers}
        self.rnn = nn.GRU(features, hidden, layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, features)

    @classmethod
    def from_config(cls, config: dict) -> BiGRUNet:
        return cls(**config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


class NoConfigNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(x)


def make(name: str) -> nn.Module:
    if name == "bigru":
        torch.manual_seed(0)
        return BiGRUNet()
    return build(name)


@pytest.fixture
def forward(run_preset):
    """``forward(name, model)``: one seeded forward of a preset (conftest's inputs) or of the BiGRU."""

    def fwd(name: str, model: nn.Module) -> torch.Tensor:
        if name != "bigru":
            return run_preset(name, model)
        with torch.no_grad():
            return model.eval()(torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1)))

    return fwd


def assert_same_masks(a: nn.Module, b: nn.Module) -> None:
    sa, sb = sites(a), sites(b)
    assert list(sa) == list(sb) and sa
    for fqn in sa:
        assert type(sa[fqn].parametrization) is type(sb[fqn].parametrization)
        assert torch.equal(sa[fqn].mask, sb[fqn].mask), fqn
        assert torch.equal(sa[fqn].effective(), sb[fqn].effective()), fqn


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-unet-cond", "tiny-dit", "bigru"])
def test_masked_round_trip_is_exact(tmp_path, forward, name):
    model = make(name)
    surgeon.inject(model, surgeon.plan(model, sparsity=0.7), init="random", seed=3)
    surgeon.save(model, tmp_path / "out")

    loaded = surgeon.load(tmp_path / "out", trust_code=name == "bigru")  # bigru is a class of this test file

    assert type(loaded) is type(model)
    assert_same_masks(model, loaded)
    assert get_plan(loaded).to_dict() == get_plan(model).to_dict()
    torch.testing.assert_close(forward(name, loaded), forward(name, model), rtol=0, atol=0)


def test_gru_weights_are_masked_after_load(tmp_path):
    model = make("bigru")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.8), init="random")
    surgeon.save(model, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out", trust_code=True)  # the class is this test file's
    rnn_sites = [s for f, s in sites(loaded).items() if f.startswith("rnn.")]
    assert len(rnn_sites) == 8  # weight_ih/hh x 2 layers x 2 directions
    for site in rnn_sites:
        assert site.effective()[~site.mask].abs().sum() == 0


def test_nm_round_trip_keeps_pattern_and_lambda(tmp_path, run_preset):
    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, nm="2:4"), lambda_w=2e-4)
    surgeon.save(model, tmp_path / "out")

    loaded = surgeon.load(tmp_path / "out")

    assert all(s.is_nm and s.parametrization.lambda_w == 2e-4 for s in sites(loaded).values())
    assert_same_masks(model, loaded)
    torch.testing.assert_close(run_preset("tiny-unet", loaded), run_preset("tiny-unet", model), rtol=0, atol=0)
    # only the N:M projection is stored: the loaded originals are zero wherever the mask is
    for site in sites(loaded).values():
        assert site.original[~site.mask].abs().sum() == 0


def test_fold_then_save_pretrained_loads_in_stock_diffusers(tmp_path, run_preset):
    from diffusers import UNet2DModel

    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.6))
    expected = run_preset("tiny-unet", model)
    surgeon.fold(model)
    model.save_pretrained(tmp_path / "dense")

    stock = UNet2DModel.from_pretrained(tmp_path / "dense", use_safetensors=True)

    torch.testing.assert_close(run_preset("tiny-unet", stock), expected, rtol=0, atol=0)


def test_packed_masks_use_numpy_packbits_little_layout(tmp_path):
    model = make("tiny-unet")  # conv_in is [8, 1, 3, 3]: rows of 9 bits, so padding is exercised
    surgeon.inject(model, surgeon.plan(model, sparsity=0.6), init="random")
    surgeon.save(model, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")

    for fqn, site in sites(model).items():
        mask = site.mask.reshape(site.mask.shape[0], -1).numpy()
        assert np.array_equal(tensors[f"{fqn}.mask"].numpy(), np.packbits(mask, axis=-1, bitorder="little")), fqn
        assert torch.equal(tensors[f"{fqn}.values"], site.original.detach()[site.mask])
        assert f"{fqn}" not in tensors


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 13), min_size=1, max_size=4), seed=st.integers(0, 2**16), p=st.floats(0, 1))
def test_pack_unpack_match_numpy_and_invert(shape, seed, p):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p
    packed = pack_mask(mask)
    rows = mask.reshape(shape[0], -1).numpy()
    assert np.array_equal(packed.numpy(), np.packbits(rows, axis=-1, bitorder="little"))
    assert torch.equal(unpack_mask(packed, shape), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8])
def test_kept_values_equal_boolean_indexing_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(6, 10, generator=g) * 50).to(dtype)
    if dtype.is_floating_point:
        t[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")]).to(dtype)
    mask = torch.rand(6, 10, generator=g) < 0.5
    for a, m in [(t, mask), (t[:, 1:7], mask[:, 1:7]), (t.t(), mask.t())]:  # non-contiguous views too
        got, want = kept_values(a, m), a[m]
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_file_bytes_are_values_plus_one_bit_per_weight(tmp_path):
    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.9, distribution="uniform"), init="random")
    surgeon.save(model, tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    data_bytes = path.stat().st_size - 8 - header

    masked = sites(model)
    values = sum(int(s.mask.sum()) * 4 for s in masked.values())
    bits = sum(s.mask.shape[0] * math.ceil(s.mask[0].numel() / 8) for s in masked.values())
    dense = sum(s.mask.numel() * 4 for s in masked.values())
    plain = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if ".parametrizations." not in k)

    assert data_bytes == values + bits + plain
    assert bits <= sum(s.mask.numel() for s in masked.values()) / 8 + sum(s.mask.shape[0] for s in masked.values())
    assert (values + bits) / dense < 0.14  # 10% of fp32 values + 1/32 for the mask bits, plus row padding


def test_recipe_and_extra_metadata_are_stored_as_json(tmp_path):
    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "out", recipe={"algorithm": "static", "sparsity": 0.5}, extra_metadata={"step": 12})
    meta = read_metadata(tmp_path / "out")
    assert meta["recipe"] == {"algorithm": "static", "sparsity": 0.5}
    assert meta["extra"] == {"step": 12}
    assert meta["format_version"] == 1
    assert set(meta["tensors"]) == set(sites(model))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"


def test_bfloat16_model_loads_back_in_bfloat16(tmp_path):
    model = make("tiny-unet").to(torch.bfloat16)
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_masks(model, loaded)


def test_masks_injected_in_two_steps_round_trip(tmp_path):
    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5, include=["conv_in*"]))
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5, exclude=["conv_in*"]))  # the model's plan now lacks conv_in
    surgeon.save(model, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out")
    assert_same_masks(model, loaded)
    assert "conv_in.weight" in get_plan(loaded).layers


def test_custom_module_without_config_needs_load_into(tmp_path):
    model = NoConfigNet(6)
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5))
    surgeon.save(model, tmp_path / "out")

    with pytest.raises(SurgeonError, match="saved without init arguments") as err:
        surgeon.load(tmp_path / "out")
    assert "load_into" in err.value.hint

    restored = surgeon.load_into(NoConfigNet(6), tmp_path / "out")
    assert_same_masks(model, restored)


# --- bad input: one line, nothing written ------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in err.value.message and err.value.hint
    return err.value.message


@pytest.fixture
def saved(tmp_path):
    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    surgeon.save(model, tmp_path / "out")
    return tmp_path / "out"


def test_truncated_file_is_one_line_error(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SurgeonError) as err:
        surgeon.load(saved)
    assert "truncated or corrupt" in one_line(err)


def test_plain_safetensors_is_refused(tmp_path):
    model = make("tiny-unet")
    (tmp_path / "plain").mkdir()
    save_file(model.state_dict(), tmp_path / "plain" / "model.safetensors")
    with pytest.raises(SurgeonError) as err:
        surgeon.load(tmp_path / "plain")
    assert one_line(err).endswith("was not written by surgeon")


def raw_metadata(folder) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tensors", "{not json", "corrupt metadata"),
        ("tensors", '{"conv_in.weight": {"shape": "8x1x3x3"}}', "corrupt metadata in "),
        ("format_version", "3", "format version '3'"),
    ],
)
def test_damaged_metadata_is_one_line_error(saved, key, value, message):
    path = saved / "model.safetensors"
    save_file(load_file(path), path, metadata={**raw_metadata(saved), key: value})
    with pytest.raises(SurgeonError) as err:
        surgeon.load(saved)
    assert message in one_line(err)


def test_popcount_must_match_kept_values(saved):
    path = saved / "model.safetensors"
    meta = read_metadata(saved)
    raw_meta = raw_metadata(saved)
    tensors = load_file(path)
    fqn = next(iter(meta["tensors"]))
    packed = tensors[f"{fqn}.mask"]
    packed[0, 0] = packed[0, 0] ^ 1  # one bit more or one fewer than there are values
    # digests recomputed, as a buggy writer would: the popcount check stands on its own
    save_file(tensors, path, metadata={**raw_meta, "digests": json.dumps(digests(tensors))})

    with pytest.raises(SurgeonError) as err:
        surgeon.load(saved)
    assert f"{fqn} keeps" in one_line(err) and "set bits" in err.value.message


def test_mask_shape_mismatch_on_load(saved):
    config_path = saved / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [8, 32]  # same tensor names, different shapes
    config_path.write_text(json.dumps(config))
    with pytest.raises(SurgeonError) as err:
        surgeon.load(saved)
    assert one_line(err).startswith("mask shape mismatch for ")


def test_mask_shape_mismatch_on_load_into_leaves_model_untouched(saved):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    other = UNet2DModel(**{**dict(make("tiny-unet").config), "block_out_channels": (8, 32)})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SurgeonError) as err:
        surgeon.load_into(other, saved)
    assert "mask shape mismatch for" in one_line(err)
    assert not sites(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_load_into_a_masked_model_is_refused(saved):
    model = surgeon.load(saved)
    with pytest.raises(SurgeonError, match="already has masks"):
        surgeon.load_into(model, saved)


def test_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(SurgeonError) as err:
        surgeon.load(tmp_path / "nowhere")
    assert "holds no model.safetensors" in one_line(err)


def test_existing_output_folder_needs_force(saved):
    (saved / "keep.txt").write_text("mine")
    model = make("tiny-unet")
    with pytest.raises(SurgeonError) as err:
        surgeon.save(model, saved)
    assert one_line(err) == f"output folder {saved} exists"
    assert err.value.hint == "pass --force to overwrite"
    assert (saved / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["out"]

    surgeon.save(model, saved, force=True)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in saved.parent.iterdir()) == ["out"]
    assert not sites(surgeon.load(saved))


def test_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("surgeon.io.container.save_file", disk_full)
    with pytest.raises(SurgeonError, match=r"^cannot write .*out: No space left on device") as err:
        surgeon.save(make("tiny-unet"), tmp_path / "out")
    assert ".tmp" not in err.value.message  # the target's name, never the temporary's
    assert list(tmp_path.iterdir()) == []


def test_unserializable_config_is_refused_before_writing(tmp_path):
    model = BiGRUNet()
    model.config["act"] = nn.SiLU()
    with pytest.raises(SurgeonError) as err:
        surgeon.save(model, tmp_path / "out")
    assert "not JSON-serializable" in one_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_a_folded_load_equals_folding_the_loaded_model(tmp_path, nm):
    from surgeon.formats import packed

    model = make("tiny-unet")
    p = surgeon.plan(model, nm=nm) if nm else surgeon.plan(model, sparsity=0.7)
    surgeon.inject(model, p, init="magnitude")
    surgeon.save(model, tmp_path / "out")
    want = surgeon.fold(surgeon.load(tmp_path / "out")).state_dict()
    got = packed.load(tmp_path / "out", folded=True)
    assert not sites(got) and got.state_dict().keys() == want.keys()
    for key, value in got.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_a_folded_load_checks_every_entry_before_filling_any(tmp_path):
    from surgeon.formats import packed

    model = make("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.7), init="magnitude")
    surgeon.save(model, tmp_path / "out")
    meta, tensors = packed.read(tmp_path / "out")
    last = list(meta["tensors"])[-1]
    tensors[f"{last}.values"] = tensors[f"{last}.values"][1:]  # one value short, in the last entry
    with pytest.raises(SurgeonError, match="keeps"):
        packed.dense_entries(meta, tensors)
    assert all(fqn not in tensors for fqn in meta["tensors"])  # nothing was filled in
