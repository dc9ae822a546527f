"""surgeon export: every format loads back to the masked model's outputs, stock diffusers reads the dense export,
the 2:4 and CSR encodings are what docs/formats.md says, the input is never changed, and bad requests write nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import preset_inputs
from helpers import assert_one_error, invoke
from torch import nn
from typer.testing import CliRunner

import surgeon
from surgeon import SurgeonError
from surgeon.cli.app import app
from surgeon.formats.csr_layers import CSRConv1x1, CSRLinear, CSRRecurrent, to_csr
from surgeon.formats.semi_structured import compress, decompress
from surgeon.io.container import digests, read_metadata
from surgeon.masking.surgery import sites
from surgeon.models.presets import build
from surgeon.sparsity.patterns import nm_mask

runner = CliRunner()


class GRUNet(nn.Module):
    """A custom (non-diffusers) sequence model: GRU input projections and Linear layers are CSR-eligible."""

    def __init__(self, features: int = 4, hidden: int = 16):
        super().__init__()
        self.config = {"features": features, "hidden": hidden}
        self.inp = nn.Linear(features, hidden)
        self.rnn = nn.GRU(hidden, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, features)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def forward(self, x_t, t, mask):
        return self.head(self.rnn(self.inp(x_t))[0])


def seq_input():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 7, 4, generator=g), torch.tensor([3, 9]), torch.ones(2, 7, dtype=torch.bool)


def forward(name: str, model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if name == "gru":
            x, t, mask = seq_input()
            return model(x.to(dtype), t, mask).float()
        args, kwargs = preset_inputs(name)
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return model(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()}).sample.float()


def masked(name: str, nm: bool = False, sparsity: float = 0.8) -> nn.Module:
    if name == "gru":
        torch.manual_seed(0)
        model = GRUNet()
    else:
        model = build(name)
    p = surgeon.plan(model, nm="2:4") if nm else surgeon.plan(model, sparsity=sparsity)
    return surgeon.inject(model, p, init="random", seed=4)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def one_line(err) -> str:
    assert "\n" not in err.value.message and err.value.hint
    return err.value.message


# --- every format round-trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-dit", "gru"])
@pytest.mark.parametrize(
    "fmt, out",
    [
        ("dense", "dense"),
        ("dense", "one.safetensors"),
        ("packed", "packed"),
        ("semi-structured", "semi"),
        ("csr", "csr.safetensors"),
    ],
)
def test_export_then_load_gives_the_masked_models_outputs(tmp_path, name, fmt, out):
    model = masked(name, nm=fmt == "semi-structured")
    expected, before = forward(name, model), state(model)
    # a masked GRU runs torch's non-flattened-weights path, so its bits can differ from any plain GRU's: the exact
    # reference for the formats that load plain weights is the folded copy (equal to `expected` for Linear/Conv)
    reference = expected if fmt == "packed" else forward(name, surgeon.fold(copy.deepcopy(model)))
    if name != "gru":
        assert torch.equal(reference, expected)
    kwargs = {"layers": "all"} if fmt == "csr" else {}
    result = surgeon.export(model, tmp_path / out, format=fmt, progress=False, **kwargs)

    loaded = surgeon.load_model(tmp_path / out, trust_code=name == "gru")  # GRUNet lives in this test module
    got = forward(name, loaded)
    if fmt == "csr":  # CSR sums in another order than dense BLAS
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert any(isinstance(m, (CSRLinear, CSRConv1x1, CSRRecurrent)) for m in loaded.modules())
    else:
        assert torch.equal(got, reference)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert bool(sites(loaded)) == (fmt == "packed")  # packed loads back masked; the others are for inference
    assert result.file_bytes > 0 and {r.name for r in result.rows} == set(surgeon.find_targets(model))
    # export never changes its input: bit-identical state, same masks, still runs
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(forward(name, model), expected)


@pytest.mark.parametrize("fmt", ["dense", "packed", "semi-structured"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_exports_are_within_cast_tolerance(tmp_path, fmt, dtype):
    model = masked("tiny-dit", nm=fmt == "semi-structured")
    expected = forward("tiny-dit", model)
    surgeon.export(model, tmp_path / "x.safetensors", format=fmt, dtype=dtype)
    loaded = surgeon.load(tmp_path / "x.safetensors")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert {p.dtype for p in loaded.parameters()} == {torch_dtype}
    tol = 2e-2 if dtype == "bf16" else 3e-3
    torch.testing.assert_close(forward("tiny-dit", loaded.float()), expected, rtol=tol, atol=tol)


def test_formats_are_told_apart_by_metadata_not_names(tmp_path):
    model = masked("tiny-unet", nm=True)
    for fmt in ("dense", "packed", "semi-structured", "csr"):
        surgeon.export(
            model, tmp_path / fmt / "model.safetensors", format=fmt, layers="all" if fmt == "csr" else "auto"
        )
        assert read_metadata(tmp_path / fmt / "model.safetensors")["layout"] == fmt
    (tmp_path / "csr" / "model.safetensors").rename(tmp_path / "csr" / "packed.safetensors")
    assert any(isinstance(m, CSRConv1x1) for m in surgeon.load(tmp_path / "csr" / "packed.safetensors").modules())


# --- stock diffusers reads the dense export -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [("tiny-unet", "UNet2DModel"), ("tiny-unet-cond", "UNet2DConditionModel"), ("tiny-dit", "DiTTransformer2DModel")],
)
def test_dense_export_loads_in_stock_diffusers(tmp_path, name, cls):
    import diffusers

    model = masked(name)
    expected = forward(name, model)
    surgeon.export(model, tmp_path / "dense", format="dense")
    assert (tmp_path / "dense" / "diffusion_pytorch_model.safetensors").is_file()
    stock = getattr(diffusers, cls).from_pretrained(tmp_path / "dense", use_safetensors=True)
    assert torch.equal(forward(name, stock), expected)


def test_dense_pipeline_export_loads_and_runs_in_stock_diffusers(tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vq = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        latent_channels=3,
        num_vq_embeddings=16,
        vq_embed_dim=3,
    )
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
    )
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    model = surgeon.load_model(tmp_path / "pipe")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.7), init="random")
    surgeon.save(model, tmp_path / "run" / "model", extra_metadata={"pipeline": str(tmp_path / "pipe")})

    r = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "run" / "model"),
            "--format",
            "dense",
            "--pipeline",
            "--out",
            str(tmp_path / "deploy"),
        ],
    )
    assert r.exit_code == 0, r.output
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "deploy", use_safetensors=True)
    folded = surgeon.fold(copy.deepcopy(model)).state_dict()
    assert all(torch.equal(v, folded[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in pipe.vqvae.state_dict().items())
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_single_file_dense_export_is_self_describing(tmp_path):
    model = masked("gru")
    surgeon.export(model, tmp_path / "teacher.safetensors", format="dense")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.safetensors"]
    meta = read_metadata(tmp_path / "teacher.safetensors")
    assert meta["layout"] == "dense" and meta["config"]["_surgeon_init"] == {"features": 4, "hidden": 16}
    from surgeon.formats.loading import load_safetensors_file

    folded = forward("gru", surgeon.fold(copy.deepcopy(model)))
    with pytest.raises(SurgeonError, match="trust"):  # the file names a class from this test module: code to run
        load_safetensors_file(tmp_path / "teacher.safetensors")
    teacher = load_safetensors_file(tmp_path / "teacher.safetensors", trust_code=True)
    assert torch.equal(forward("gru", teacher), folded)
    assert torch.equal(forward("gru", surgeon.load_model(tmp_path / "teacher.safetensors", trust_code=True)), folded)


# --- the encodings ------------------------------------------------------------------------------------------------


def test_semi_structured_positions_decode_to_the_known_mask():
    w = torch.tensor([[0.0, 1.5, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 5.0, 0.0]])
    values, meta = compress(w)
    # row 0: groups keep (1, 3) and (0, 3); row 1: (0, 1) for the empty group, (1, 2); first position in low bits
    assert values.tolist() == [[1.5, 2.0, 3.0, 4.0], [0.0, 0.0, -1.0, 5.0]]
    assert meta.dtype == torch.uint8 and meta.tolist() == [
        [1 | 3 << 2 | 0 << 4 | 3 << 6],
        [0 | 1 << 2 | 1 << 4 | 2 << 6],
    ]
    assert torch.equal(decompress(values, meta, w.shape), w)


def test_semi_structured_round_trips_convs_in_nhwc_groups():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    w = w * nm_mask(w, 2, 4)
    values, meta = compress(w)
    assert values.shape == (6, 8 * 9 // 2) and meta.shape == (6, -(-8 * 9 // 8))
    assert torch.equal(decompress(values, meta, w.shape), w)


def test_semi_structured_file_bytes_are_half_the_values_plus_two_bits(tmp_path):
    model = masked("tiny-dit", nm=True)
    result = surgeon.export(model, tmp_path / "s", format="semi-structured", dtype="fp16")
    for r in result.rows:
        if r.storage == "2:4":
            n = torch.Size(r.shape).numel()
            assert r.bytes == n // 2 * 2 + r.shape[0] * -(-n // r.shape[0] // 8)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first, bidirectional", [(True, True), (False, False)])
def test_csr_recurrent_gives_the_dense_outputs(cls, batch_first, bidirectional):
    torch.manual_seed(0)
    rnn = cls(6, 5, num_layers=2, batch_first=batch_first, bidirectional=bidirectional).eval()
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_ih"):
                p.mul_(torch.rand_like(p) > 0.8)
    sparse = CSRRecurrent(rnn, {})
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        for args in ((x,), (x[0],)):  # batched, and unbatched
            y, state = rnn(*args)
            y2, state2 = sparse(*args)
            torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
            for a, b in zip(state if cls is nn.LSTM else (state,), state2 if cls is nn.LSTM else (state2,)):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_csr_linear_and_1x1_conv_give_the_dense_outputs():
    torch.manual_seed(0)
    lin, conv = nn.Linear(12, 7), nn.Conv2d(12, 7, 1)
    with torch.no_grad():
        for m in (lin, conv):
            m.weight.mul_(torch.rand_like(m.weight) > 0.9)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(CSRLinear(to_csr(lin.weight), lin.bias)(x), lin(x), rtol=1e-5, atol=1e-6)
    img = torch.randn(2, 12, 3, 4)
    w = to_csr(conv.weight.reshape(7, 12))
    torch.testing.assert_close(CSRConv1x1(w, conv.bias)(img), conv(img), rtol=1e-5, atol=1e-6)


def test_csr_auto_measures_and_records_its_choice(tmp_path):
    model = masked("gru", sparsity=0.9)
    result = surgeon.export(model, tmp_path / "c", format="csr", progress=False)
    meta = read_metadata(tmp_path / "c")
    measured = [r for r in result.rows if "ms" in r.note]
    assert measured, "auto measures the sparse layers on the model's own inputs"
    chosen = set(meta["csr"])
    assert all((r.storage == "csr") == (r.name.rpartition(".")[0] in chosen) for r in result.rows if r.kind == "linear")
    loaded = surgeon.load(tmp_path / "c", trust_code=True)
    torch.testing.assert_close(forward("gru", loaded), forward("gru", model), rtol=1e-5, atol=1e-5)


# --- copies, inspect, bad input -----------------------------------------------------------------------------------


def test_inspect_reads_every_format(tmp_path):
    model = masked("tiny-unet", nm=True)
    for fmt, out in (
        ("dense", "d"),
        ("dense", "d.safetensors"),
        ("packed", "p"),
        ("semi-structured", "s"),
        ("csr", "c"),
    ):
        surgeon.export(model, tmp_path / out, format=fmt, layers="all" if fmt == "csr" else "auto")
        r = runner.invoke(app, ["inspect", str(tmp_path / out), "--json"])
        assert r.exit_code == 0, (fmt, r.output)


@pytest.fixture
def saved_unstructured(tmp_path):
    model = masked("tiny-unet")
    surgeon.save(model, tmp_path / "model")
    return tmp_path / "model"


def test_bad_requests_are_one_line_and_write_nothing(tmp_path, saved_unstructured):
    src = str(saved_unstructured)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = [
        (["--format", "nope", "--out", str(tmp_path / "o")], 2, "unknown export format 'nope'"),
        (["--format", "semi-structured", "--out", str(tmp_path / "o")], 1, "the model is not 2:4"),
        (["--format", "packed", "--out", str(saved_unstructured / "inner"), "--force"], 1, "is inside the model"),
        (["--format", "csr", "--dtype", "fp16", "--out", str(tmp_path / "o")], 1, "csr format cannot hold fp16"),
        (["--format", "dense", "--dtype", "fp8", "--out", str(tmp_path / "o")], 2, "unknown dtype 'fp8'"),
        (["--format", "packed", "--pipeline", "--out", str(tmp_path / "o")], 2, "--pipeline is for --format dense"),
    ]
    for args, code, message in cases:
        assert_one_error(invoke("export", src, *args), message, code=code)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_semi_structured_prune_opts_into_one_shot_2_4_with_a_warning(tmp_path):
    model = masked("tiny-dit")
    with pytest.warns(UserWarning, match="pruned .* tensors to 2:4 by magnitude"):
        result = surgeon.export(model, tmp_path / "s", format="semi-structured", prune=True)
    loaded = surgeon.load(tmp_path / "s")
    from surgeon.masking.inspection import report

    assert all(r.nm_valid for r in report(loaded).rows if r.nm_valid is not None)
    assert any("pruned" in r.note for r in result.rows)


def test_existing_output_needs_force(tmp_path):
    model = masked("tiny-unet")
    (tmp_path / "x.safetensors").write_bytes(b"mine")
    with pytest.raises(SurgeonError) as err:
        surgeon.export(model, tmp_path / "x.safetensors", format="dense")
    assert "exists" in one_line(err) and (tmp_path / "x.safetensors").read_bytes() == b"mine"
    surgeon.export(model, tmp_path / "x.safetensors", format="dense", force=True)
    assert read_metadata(tmp_path / "x.safetensors")["layout"] == "dense"


def test_damaged_semi_structured_and_csr_files_are_one_line_errors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = masked("tiny-dit", nm=True)
    for fmt, part, damage in (
        ("semi-structured", ".meta", lambda t: t.zero_()),  # positions (0, 0): not ascending
        ("csr", ".col", lambda t: t.fill_(10_000)),
    ):  # a column outside the matrix
        path = tmp_path / f"{fmt}.safetensors"
        surgeon.export(model, path, format=fmt, layers="all" if fmt == "csr" else "auto")
        with safe_open(str(path), "pt") as f:
            raw = f.metadata()
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith(part))
        damage(tensors[key])
        save_file(tensors, path, metadata=raw)
        with pytest.raises(SurgeonError, match=f"damaged file: {key}"):  # the digest notices first
            surgeon.load(path)
        # digests recomputed, as a buggy writer would: the format's own checks stand on their own
        save_file(tensors, path, metadata={**raw, "digests": json.dumps(digests(tensors))})
        with pytest.raises(SurgeonError) as err:
            surgeon.load(path)
        assert "is corrupt: " + key.removesuffix(part) in one_line(err), fmt


@pytest.mark.parametrize("csr_is_slower", [True, False])
def test_csr_auto_keeps_a_choice_only_if_the_whole_step_is_faster(csr_is_slower):
    import time

    from surgeon.formats.csr import _confirm_whole_step

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    def step(m):  # a step whose cost depends only on whether the model computes with CSR
        has_csr = any(isinstance(x, CSRLinear) for x in m.modules())
        time.sleep(0.004 if has_csr == csr_is_slower else 0.0)

    decided = {
        "0": {"kind": "linear", "dense_ms": 1.0, "csr_ms": 0.5, "why": None},
        "1": {"kind": "linear", "dense_ms": 1.0, "csr_ms": 2.0, "why": "not faster as CSR"},
    }
    out = _confirm_whole_step(model, copy.deepcopy(decided), step)
    assert out["1"] == decided["1"]
    assert (out["0"]["why"] is not None) == csr_is_slower
    if csr_is_slower:
        assert out["0"]["why"].startswith("whole step not faster with CSR")
    assert not any(isinstance(x, CSRLinear) for x in model.modules())  # the check converts a copy


@pytest.mark.parametrize("nm", [False, True])
@pytest.mark.parametrize(
    "fmt, out, dtype", [("dense", "dense", None), ("dense", "one.safetensors", "fp16"), ("packed", "packed", None)]
)
def test_dense_and_packed_read_a_callers_model_without_copying_it(tmp_path, monkeypatch, nm, fmt, out, dtype):
    import surgeon.formats.exporter as exporter

    def no_copy(model):
        raise AssertionError("the export copied the caller's model")

    monkeypatch.setattr(exporter, "copy_model", no_copy)
    model = masked("tiny-unet", nm=nm)
    before, expected = state(model), forward("tiny-unet", surgeon.fold(copy.deepcopy(model)))
    surgeon.export(model, tmp_path / out, format=fmt, dtype=dtype, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is unchanged
    got = forward("tiny-unet", surgeon.load_model(tmp_path / out).float())
    if dtype is None:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
