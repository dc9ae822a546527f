"""Reliability: every float is finite and in range, runs that diverge stop, resumes are exact and refuse
mismatches, interrupts and bad settings end in one line. Each test reproduces a defect found by an adversarial pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import SyntheticImageTask, masks_of, one_thread, small_recipe, tiny_model  # noqa: F401
from safetensors import safe_open
from test_cli_sparsify import write_images
from typer.testing import CliRunner

import surgeon
from surgeon import SurgeonError
from surgeon.cli.app import app
from surgeon.recipe import Recipe, load_recipe
from surgeon.training import checkpoint as ckpt
from surgeon.training.loop import train


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_plan_rejects_a_power_scale_that_is_not_finite_and_non_negative(value):
    # NaN used to make the ERK solve loop forever
    model = surgeon.load_model("tiny-unet")
    with pytest.raises(SurgeonError, match="power_scale"):
        surgeon.plan(model, sparsity=0.5, power_scale=value)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_recipe_power_scale_nan_or_inf_is_rejected_naming_the_key(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(f"algorithm: rigl\nsparsity: 0.5\npower_scale: {text}\n")
    with pytest.raises(SurgeonError, match="'power_scale' must be a finite number"):
        load_recipe(path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("optimizer.lr", float("nan"), "'optimizer.lr' must be a finite number"),
        ("optimizer.lr", float("inf"), "'optimizer.lr' must be a finite number"),
        ("optimizer.weight_decay", -0.1, "weight_decay must be ≥ 0"),
        ("optimizer.betas", [0.9, 1.0], "betas"),
        ("optimizer.betas", [-0.1, 0.99], "betas"),
        ("optimizer.eps", 0.0, "eps must be > 0"),
        ("diffusion.timesteps", 0, "diffusion.timesteps must be ≥ 1"),
        ("diffusion.beta_schedule", "cubic", "unknown beta_schedule 'cubic'"),
        ("diffusion.beta_start", 0.0, "diffusion.beta_start must be in (0, 1)"),
        ("diffusion.beta_end", 1.5, "diffusion.beta_end must be in (0, 1)"),
        ("diffusion.sample_steps", 2000, "sample_steps must be in [1, timesteps=1000]"),
        ("training.seed", 2**64, "seed"),
        ("training.seed", -1, "seed"),
        ("training.eval_batches", 0, "eval_batches must be ≥ 1"),
        ("training.num_samples", -1, "num_samples must be ≥ 0"),
        ("lambda_w", -1.0, "lambda_w"),
        ("power_scale", -0.5, "power_scale"),
        ("distill.lambda_1", -1.0, "distill weights"),
    ],
)
def test_recipe_values_out_of_range_get_their_own_message(key, value, words):
    with pytest.raises(SurgeonError) as info:
        load_recipe("rigl").override(**{key: value})
    assert words in info.value.message
    assert info.value.hint and "SURGEON_DEBUG" not in info.value.hint


def test_beta_start_above_beta_end_is_refused():
    with pytest.raises(SurgeonError, match="above beta_end"):
        Recipe.from_dict({"diffusion": {"beta_start": 0.02, "beta_end": 0.001}})


# ---- resume: partial log line, unlogged losses, refusals; divergence ----------------------------------------------


def _records(path):
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()]


RESUME = {"training.steps": 8, "training.log_every": 3, "training.checkpoint_every": 4, "training.keep_checkpoints": 0}


def _train(out, resume=None, stop_after=None, **changes):
    recipe = small_recipe("rigl", **{**RESUME, **changes})
    model = tiny_model(recipe)
    return train(model, SyntheticImageTask(model), recipe, out, resume=resume, progress=False, stop_after=stop_after)


def test_resume_off_a_log_step_after_a_torn_log_line_logs_bit_identical(tmp_path):
    # the checkpoint at step 4 falls between log steps 3 and 6: step 4's loss is in no log line yet
    _train(tmp_path / "cut", stop_after=5)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.12')  # what a kill mid-write leaves
    _train(tmp_path / "cut", resume=tmp_path / "cut" / "checkpoints" / "step-0000004.safetensors")
    _train(tmp_path / "full")
    assert _records(tmp_path / "cut" / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")


def test_resume_refuses_a_damaged_log_line_in_the_middle(tmp_path):
    _train(tmp_path / "run", stop_after=5)
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(SurgeonError, match="line 1 is not JSON"):
        _train(tmp_path / "run", resume=tmp_path / "run")


def test_resume_refuses_another_algorithms_checkpoint(tmp_path):
    _train(tmp_path / "run", stop_after=4)  # rigl
    with pytest.raises(SurgeonError, match="made by algorithm 'rigl', not 'magran'") as info:
        recipe = small_recipe("magran", **RESUME)
        model = tiny_model(recipe)
        train(model, SyntheticImageTask(model), recipe, tmp_path / "run", resume=tmp_path / "run", progress=False)
    assert "algorithm: rigl" in info.value.hint


def test_resume_refuses_steps_below_the_checkpoint(tmp_path):
    _train(tmp_path / "run", stop_after=4)
    with pytest.raises(SurgeonError, match="at step 4, past the run's 3 steps") as info:
        _train(tmp_path / "run", resume=tmp_path / "run", **{"training.steps": 3, "training.checkpoint_every": 2})
    assert "--steps 4" in info.value.hint


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = small_recipe(
        "static",
        **{
            "training.steps": 12,
            "training.log_every": 2,
            "training.checkpoint_every": 3,
            "training.keep_checkpoints": 0,
        },
    )
    model = tiny_model(recipe)

    class Poisoned(SyntheticImageTask):
        calls = 0

        def noisy_batch(self, batch, generator=None):
            inputs, target, weight = super().noisy_batch(batch, generator)
            Poisoned.calls += 1
            if Poisoned.calls == 5:  # step 5: the loss is NaN
                target = target * float("nan")
            return inputs, target, weight

    with pytest.raises(SurgeonError, match="the loss is not finite at step 5") as info:
        train(model, Poisoned(model), recipe, tmp_path / "run", progress=False)
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-0000003.safetensors"]  # step 6 was not saved: it came after the NaN
    assert str(found[0]) in info.value.hint


def test_cli_lr_inf_is_refused_and_a_huge_lr_stops_with_an_error_not_a_nan_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = tmp_path / "images"
    write_images(images)
    base = [
        "sparsify",
        "tiny-unet",
        "--recipe",
        "static",
        "--data",
        str(images),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--no-progress",
        "--no-samples",
    ]
    refused = CliRunner().invoke(app, [*base, "--lr", "inf", "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "'optimizer.lr' must be a finite number" in refused.stderr
    assert not (tmp_path / "a").exists()
    diverged = CliRunner().invoke(app, [*base, "--lr", "1e30", "--out", str(tmp_path / "b")])
    assert diverged.exit_code == 1, diverged.output
    assert "error: training diverged" in diverged.stderr and "Traceback" not in diverged.output
    assert not (tmp_path / "b" / "model").exists()


# ---- Ctrl-C before training starts ----------------------------------------------------------------------------------


def test_importing_surgeon_is_light_so_ctrl_c_is_caught_from_the_first_instant():
    # torch takes seconds to import; the console script installs its guard first, and `import surgeon` must not
    # drag torch in before it
    code = (
        "import sys, surgeon.cli.entry; print(sorted(m for m in ('torch', 'diffusers', 'typer') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _InterruptImport:
    """A meta-path finder that raises KeyboardInterrupt when ``name`` is imported: Ctrl-C in mid-import."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_cli_imports_exits_130_with_one_line(monkeypatch, capsys):
    from surgeon.cli import entry

    monkeypatch.delitem(sys.modules, "surgeon.cli.app", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport("surgeon.cli.app"), *sys.meta_path])
    with pytest.raises(SystemExit) as info:
        entry.main()
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: interrupted", "hint: nothing was written; run the command again"]


def test_ctrl_c_while_a_command_loads_its_model_exits_130_with_one_line(tmp_path, monkeypatch):
    import surgeon.formats.loading

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(surgeon.formats.loading, "load_model", interrupted)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["sparsify", "tiny-unet", "--out", str(out), "--no-progress"])
    assert result.exit_code == 130, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0] == "error: interrupted" and lines[1].startswith("hint: ") and len(lines) == 2
    assert "Traceback" not in result.output and not out.exists()


# ---- catch-all cases get their own message; nothing half-made is left ------------------------------------------------

WRONG_SHAPE = '''
import torch
from torch import nn


class HalfWidth(nn.Module):
    """An image denoiser whose output is half as wide as its input."""

    def __init__(self):
        super().__init__()
        self.config = {"sample_size": 16, "in_channels": 1}
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)[..., :8]
'''


def _cli(tmp_path, *args):
    return CliRunner().invoke(app, ["sparsify", *map(str, args)])


def _one_error(result, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    assert "SURGEON_DEBUG" not in lines[1]  # its own hint, not the catch-all's
    return lines[0]


def test_a_model_whose_output_has_the_wrong_shape_is_named_and_leaves_no_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "net.py").write_text(WRONG_SHAPE)
    write_images(tmp_path / "images")
    out = tmp_path / "run"
    line = _one_error(
        _cli(
            tmp_path,
            f"{tmp_path / 'net.py'}:HalfWidth",
            "--data",
            tmp_path / "images",
            "--steps",
            2,
            "--batch-size",
            2,
            "--out",
            out,
            "--no-progress",
        )
    )
    assert "output has shape [2, 1, 16, 8], but the noise it must predict has shape [2, 1, 16, 16]" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["under-a-file", "exists-as-file"])
def test_an_out_that_cannot_be_created_is_refused_before_the_model_loads(tmp_path, monkeypatch, kind):
    import surgeon.formats.loading

    monkeypatch.setattr(surgeon.formats.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if kind == "under-a-file" else tmp_path / "file"
    line = _one_error(_cli(tmp_path, "tiny-unet", "--out", out, "--no-progress"))
    assert str(out) in line
    assert (tmp_path / "file").read_text() == "x"


def test_resume_without_out_continues_in_the_resumed_run_folder_and_never_touches_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images")
    args = [
        "tiny-unet",
        "--recipe",
        "static",
        "--data",
        "images",
        "--steps",
        4,
        "--batch-size",
        2,
        "--no-progress",
        "--no-samples",
    ]
    # a complete run sits where the default --out would point
    assert _cli(tmp_path, *args).exit_code == 0
    default = tmp_path / "runs" / "tiny-unet-static-s0.5"
    before = {p: p.read_bytes() for p in default.rglob("*") if p.is_file()}
    # another run, interrupted at step 2 (stop_after stands for Ctrl-C here)
    recipe = small_recipe(
        "static",
        **{"training.steps": 4, "training.batch_size": 2, "training.checkpoint_every": 2, "training.log_every": 1},
    )
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "A", progress=False, stop_after=2)
    resumed = _cli(tmp_path, *args, "--resume", tmp_path / "A" / "checkpoints" / "step-0000002.safetensors")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "A" / "model" / "model.safetensors").is_file()
    assert {p: p.read_bytes() for p in default.rglob("*") if p.is_file()} == before


def test_resume_into_another_non_empty_folder_needs_force(tmp_path, monkeypatch):
    import surgeon.formats.loading

    monkeypatch.setattr(surgeon.formats.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = small_recipe("static", **{"training.steps": 4, "training.checkpoint_every": 2})
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "A", progress=False, stop_after=2)
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / "keep.txt").write_text("mine")
    line = _one_error(
        _cli(tmp_path, "tiny-unet", "--recipe", "static", "--resume", tmp_path / "A", "--out", tmp_path / "B")
    )
    assert "holds another run than the one resumed" in line
    assert (tmp_path / "B" / "keep.txt").read_text() == "mine"


def test_a_forced_fresh_run_never_leaves_the_old_runs_checkpoints_for_resume(tmp_path):
    recipe = small_recipe(
        "static", **{"training.steps": 8, "training.checkpoint_every": 2, "training.keep_checkpoints": 0}
    )
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "run", progress=False)  # checkpoints 2, 4, 6
    short = small_recipe("static", **{"training.steps": 4, "training.checkpoint_every": 2})
    model = tiny_model(short)
    with pytest.raises(SurgeonError, match="holds checkpoints of an earlier run"):
        train(model, SyntheticImageTask(model), short, tmp_path / "run", progress=False)
    from surgeon.training.run import open_run

    open_run(tmp_path / "run", short, force=True)
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == []


# ---- model folders never run code without an opt-in ---------------------------------------------------------------

PAYLOAD = """
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("the payload ran")
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)
"""


def _folder_naming(tmp_path, cls_path: str):
    """A surgeon-saved folder whose config.json names ``cls_path`` (what an attacker would edit in)."""
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(8, 8)
    folder = tmp_path / "model"
    surgeon.save(model, folder)
    (folder / "config.json").write_text(json.dumps({"_surgeon_class": cls_path, "_surgeon_init": {}}))
    return folder


@pytest.mark.parametrize("relative", [False, True])
def test_a_folder_naming_a_python_file_runs_nothing_without_trust_code(tmp_path, monkeypatch, relative):
    (tmp_path / "evil.py").write_text(PAYLOAD)
    monkeypatch.chdir(tmp_path)
    folder = _folder_naming(tmp_path, f"{'evil.py' if relative else tmp_path / 'evil.py'}:Net")
    for call in (lambda: surgeon.load(folder), lambda: surgeon.load_model(folder)):
        with pytest.raises(SurgeonError, match="names code to run") as info:
            call()
        assert "trust_code=True" in info.value.hint and "--trust-code" in info.value.hint
    line = _one_error(CliRunner().invoke(app, ["inspect", str(folder)]))
    assert "names code to run" in line
    assert not (tmp_path / "RAN").exists()
    # the opt-in: the user says they trust it
    result = CliRunner().invoke(app, ["inspect", str(folder), "--trust-code"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "RAN").exists()


@pytest.mark.parametrize("cls_path", ["subprocess:Popen", "torch.nn:Linear", "os:system", "tests.conftest:X"])
def test_a_folder_naming_another_module_imports_nothing_without_trust_code(tmp_path, cls_path):
    folder = _folder_naming(tmp_path, cls_path)
    module = cls_path.split(":")[0]
    was_loaded = module in sys.modules
    with pytest.raises(SurgeonError, match=f"names code to run \\(the module {module},"):
        surgeon.load(folder)
    assert (module in sys.modules) == was_loaded


def test_surgeons_own_models_and_diffusers_classes_need_no_opt_in(tmp_path):
    from surgeon.models.chirodiff import ChiroDiffNet

    model = ChiroDiffNet(hidden=8, layers=1)
    surgeon.save(model, tmp_path / "chiro")
    assert type(surgeon.load(tmp_path / "chiro")) is ChiroDiffNet
    unet = surgeon.load_model("tiny-unet")
    surgeon.save(unet, tmp_path / "unet")
    assert type(surgeon.load(tmp_path / "unet")) is type(unet)


# ---- safetensors only -----------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_from_pretrained_in_the_project_reads_safetensors_only():
    offenders = []
    for folder in ("surgeon", "cli", "examples", "benchmarks", "tests"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if ".from_pretrained(" in line and "use_safetensors=True" not in line:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}")
    assert not offenders, offenders


class _NoUnpickling:
    def __enter__(self):
        import pickle

        self.saved = pickle.Unpickler, torch.load
        pickle.Unpickler = lambda *a, **k: pytest.fail("something was unpickled")
        torch.load = lambda *a, **k: pytest.fail("torch.load was called")

    def __exit__(self, *exc):
        import pickle

        pickle.Unpickler, torch.load = self.saved


def test_a_pipeline_whose_autoencoder_is_pickled_only_is_refused_without_unpickling(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tmp_path / "pipe"
    surgeon.load_model("tiny-unet-cond").save_pretrained(pipe / "unet")
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    vae.save_pretrained(pipe / "vae", safe_serialization=False)  # diffusion_pytorch_model.bin only
    (pipe / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    )
    write_images(tmp_path / "images")
    with _NoUnpickling():
        result = CliRunner().invoke(
            app,
            [
                "sparsify",
                str(pipe),
                "--data",
                str(tmp_path / "images"),
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
            ],
        )
    line = _one_error(result)
    assert "vae has no safetensors weights" in line and "diffusion_pytorch_model.bin" in line
    assert not (tmp_path / "run").exists()
    # and a model folder with pickled weights only
    with _NoUnpickling(), pytest.raises(SurgeonError, match="no safetensors weights"):
        surgeon.load_model(pipe / "vae")


# ---- integrity: a per-tensor digest, verified on load -----------------------------------------------------------------


def _swap_two_bits(file: Path, tensor: str) -> None:
    """Swap two differing bits inside one byte of ``tensor``'s data: same length, same set-bit count."""
    raw = bytearray(file.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    for i in range(8 + n + start, 8 + n + end):
        b = raw[i]
        for bit in range(7):
            if ((b >> bit) & 1) != ((b >> (bit + 1)) & 1):
                raw[i] = b ^ (0b11 << bit)
                file.write_bytes(bytes(raw))
                return
    raise AssertionError("no byte with two differing bits")


def test_a_mask_with_two_bits_swapped_is_reported_as_a_damaged_file(tmp_path):
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    surgeon.save(model, tmp_path / "m")
    mask = f"{next(iter(surgeon.masking.surgery.sites(model)))}.mask"
    _swap_two_bits(tmp_path / "m" / "model.safetensors", mask)
    with pytest.raises(SurgeonError, match=rf"^damaged file: {mask} in "):
        surgeon.load(tmp_path / "m")
    line = _one_error(CliRunner().invoke(app, ["inspect", str(tmp_path / "m")]))
    assert line.startswith(f"error: damaged file: {mask}")


def test_a_damaged_training_checkpoint_is_refused_naming_the_tensor(tmp_path):
    _train(tmp_path / "run", stop_after=4)
    path = tmp_path / "run" / "checkpoints" / "step-0000004.safetensors"
    with safe_open(str(path), "pt") as f:
        name = next(k for k in f.keys() if k.endswith(".original"))
    _swap_two_bits(path, name)
    with pytest.raises(SurgeonError, match=f"damaged file: {name}"):
        _train(tmp_path / "run", resume=path)


# ---- a mistyped local path is not a hub id --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, words",
    [
        ("runs/nothere", "no such folder: runs/nothere"),
        ("runs/realrn", "no such folder: runs/realrn"),
        ("./model", "no such folder: ./model"),
        ("missing.safetensors", "no such file: missing.safetensors"),
    ],
)
def test_a_mistyped_local_path_says_no_such_folder_and_never_asks_the_hub(tmp_path, monkeypatch, ref, words):
    import surgeon.formats.loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(surgeon.formats.loading, "_load_hub", lambda ref: pytest.fail(f"{ref} was taken for a hub id"))
    (tmp_path / "runs" / "realrun").mkdir(parents=True)
    with pytest.raises(SurgeonError) as info:
        surgeon.load_model(ref)
    assert info.value.message == words
    if ref == "runs/realrn":
        assert info.value.hint == "did you mean runs/realrun?"


def test_a_hub_id_whose_org_is_no_local_folder_still_goes_to_the_hub(tmp_path, monkeypatch):
    import surgeon.formats.loading

    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(surgeon.formats.loading, "_load_hub", lambda ref: asked.append(ref))
    surgeon.load_model("google/ddpm-cifar10-32")
    assert asked == ["google/ddpm-cifar10-32"]


# ---- a sparse model saved by surgeon is a valid MODEL for sparsify ---------------------------------------------------


def _saved_sparse_model(tmp_path):
    recipe = small_recipe("rigl", **{"training.steps": 3, "sparsity": 0.8})
    model = tiny_model(recipe)
    train(model, SyntheticImageTask(model), recipe, tmp_path / "first", progress=False)
    surgeon.save(model, tmp_path / "first" / "model")
    return tmp_path / "first" / "model", masks_of(model)


@pytest.mark.parametrize("ref", ["model", "run folder"])
def test_sparsify_continues_a_saved_sparse_model_from_its_own_masks_with_init_pretrained(tmp_path, ref):
    from surgeon.training.run import sparsify

    folder, masks = _saved_sparse_model(tmp_path)
    recipe = small_recipe("static", **{"training.steps": 2, "sparsity": 0.5})
    task = SyntheticImageTask(surgeon.load(folder))
    sparsify(
        folder if ref == "model" else folder.parent,
        recipe,
        task,
        tmp_path / "again",
        init="pretrained",
        progress=False,
        samples=False,
    )
    again = surgeon.load(tmp_path / "again" / "model")
    assert masks_of(again).keys() == masks.keys()
    assert all(torch.equal(masks_of(again)[f], m) for f, m in masks.items())  # static: its own masks, unchanged


def test_sparsify_restarts_a_saved_sparse_model_from_scratch(tmp_path):
    from surgeon.training.run import sparsify

    folder, masks = _saved_sparse_model(tmp_path)
    recipe = small_recipe("static", **{"training.steps": 2, "sparsity": 0.5, "training.seed": 7})
    task = SyntheticImageTask(surgeon.load(folder))
    summary = sparsify(str(folder), recipe, task, tmp_path / "again", init="scratch", progress=False, samples=False)
    again = surgeon.load(tmp_path / "again" / "model")
    assert abs(summary.sparsity - 0.5) < 0.01  # the recipe's budget, not the input's 0.8
    assert any(not torch.equal(masks_of(again)[f], m) for f, m in masks.items() if f in masks_of(again))


# ---- a forced overwrite never leaves nothing at the target -----------------------------------------------------------

DIE_BETWEEN_RENAMES = """
import os, signal, sys
import surgeon.io.atomic

real = os.replace
calls = []

def replace(src, dst):
    calls.append(dst)
    if len(calls) == 2:  # the old copy is aside, the new one not yet in place: the worst moment to die
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

surgeon.io.atomic.os.replace = replace
model = surgeon.load_model("tiny-unet")
surgeon.inject(model, surgeon.plan(model, sparsity=0.9), seed=1)
surgeon.save(model, sys.argv[1], force=True)
"""


def test_a_crash_inside_a_forced_overwrite_keeps_the_old_copy_findable_and_the_next_save_restores_it(tmp_path):
    from surgeon.io.atomic import siblings

    target = tmp_path / "m"
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), seed=0)
    surgeon.save(model, target)
    before = (target / "model.safetensors").read_bytes()
    script = tmp_path / "die.py"
    script.write_text(DIE_BETWEEN_RENAMES)
    proc = subprocess.run([sys.executable, str(script), str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr
    assert not target.exists()
    [old] = siblings(target, "old")
    assert (old / "model.safetensors").read_bytes() == before  # the old copy is intact, aside
    assert siblings(target, "tmp")  # and the dead writer's temporary is left over

    # a read reports where the old copy is
    with pytest.raises(SurgeonError, match="an overwrite of it was interrupted, the previous copy is") as info:
        surgeon.load(target)
    assert f"mv {old} {target}" in info.value.hint
    # a write without --force restores it first, so it is refused as existing: nothing was lost
    with pytest.raises(SurgeonError, match="exists"):
        surgeon.save(model, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert not siblings(target, "old") and not siblings(target, "tmp")  # the stale temporary is gone too


def test_a_killed_checkpoint_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a pid that has exited
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    stale = folder / f".step-0000004.safetensors.tmp-{dead}-0123abcd"
    stale.write_bytes(b"x" * 1000)
    live = folder / f".step-0000004.safetensors.tmp-{os.getpid()}-0123abce"  # a writer still at work: kept
    live.write_bytes(b"x")
    from surgeon.io.atomic import atomic_path

    with atomic_path(folder / "step-0000004.safetensors") as tmp:
        tmp.write_bytes(b"new")
    assert not stale.exists() and live.exists()
    assert (folder / "step-0000004.safetensors").read_bytes() == b"new"


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
