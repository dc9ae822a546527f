"""N:M fine-tuning (SparseDM): the teacher stays frozen and outside the student; the objective, STE and SR-STE do
exactly what the paper writes; every recipe ends N:M-valid and reloads to the same outputs; a stage switch keeps
weights and AdamW moments; teachers come from folders or bare .safetensors files; bad inputs are one error + hint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import (
    USER_MODULE,
    assert_one_error,
    build_pipeline,
    class_folder,
    invoke,
    tiny_dit,
    write_images,
    write_png,
)
from helpers_train import SyntheticImageTask, one_thread, state_of  # noqa: F401
from torch import nn
from typer.testing import CliRunner

import surgeon
import surgeon.training.loop as train_mod
from surgeon.cli.app import app
from surgeon.errors import SurgeonError
from surgeon.masking.surgery import sites
from surgeon.models import presets
from surgeon.recipe import load_recipe
from surgeon.tasks.base import Task
from surgeon.training import checkpoint as ckpt
from surgeon.training.objectives import DistillLoss
from surgeon.training.run import finetune


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ft_recipe(name: str = "sparsedm", **changes):
    """A shipped N:M recipe shrunk for tests."""
    base = {
        "training.steps": 4,
        "training.batch_size": 4,
        "training.checkpoint_every": 10_000,
        "training.log_every": 1,
        "training.eval_batches": 1,
        "training.num_samples": 4,
        "diffusion.sample_steps": 2,
        "optimizer.lr": 1e-3,
    }
    if name == "one-shot":
        base.pop("training.steps")
    return load_recipe(name).override(**{**base, **changes})


def forward(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 700])).sample


# --------------------------------------------------------------------------------------------- the objective
class _Stub(Task):
    """predict() returns what the 'model' (a plain callable) returns: hand-made predictions."""

    def predict(self, model, inputs):
        return model(inputs)


def test_distillation_and_epsilon_terms_are_weighted_as_configured_hand_computed():
    student = lambda inputs: torch.tensor([[1.0, 2.0]])  # noqa: E731
    teacher = nn.Identity()  # the teacher's prediction: the inputs themselves, [[0, 0]]
    eps = torch.tensor([[1.0, 0.0]])
    loss = DistillLoss(_Stub(), teacher, lambda_1=0.5, lambda_2=2.0)
    # λ1·mean((1-0)², (2-0)²) + λ2·mean((1-1)², (2-0)²) = 0.5·2.5 + 2·2 = 5.25
    assert loss(student, torch.zeros(1, 2), eps, None).item() == 5.25
    assert DistillLoss(_Stub(), teacher, 0.0, 1.0)(student, torch.zeros(1, 2), eps, None).item() == 2.0


# -------------------------------------------------------------------------------------------- STE and SR-STE
def _hand_sgd_step(lambda_w: float, lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    lin = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[4.0, -3.0, 2.0, -1.0]]))  # 2:4 keeps 4 and -3, prunes 2 and -1
    surgeon.inject(lin, surgeon.plan(lin, nm="2:4"), lambda_w=lambda_w)
    w = lin.parametrizations.weight.original
    before = w.detach().clone()
    opt = torch.optim.SGD([w], lr=lr)
    lin(torch.ones(1, 4, dtype=torch.float64)).sum().backward()  # dL/dS(W) = x = 1 at every position
    grad = w.grad.clone()
    opt.step()
    return before, w.detach().clone(), grad


def test_ste_passes_the_gradient_to_pruned_positions():
    before, after, grad = _hand_sgd_step(lambda_w=0.0)
    assert grad.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # pruned positions get dL/dS(W) too, straight through
    assert after.tolist() == (before - 0.1).tolist()  # so every weight moved, pruned ones included


def test_sr_ste_moves_pruned_weights_by_exactly_lr_lambda_w_w_per_sgd_step():
    lr, lam = 0.1, 0.5
    before, plain, _ = _hand_sgd_step(0.0, lr)
    _, sr, grad = _hand_sgd_step(lam, lr)
    pruned = torch.tensor([[False, False, True, True]])
    assert grad.tolist() == [[1.0, 1.0, 1.0 + lam * 2.0, 1.0 + lam * -1.0]]
    torch.testing.assert_close(plain - sr, torch.where(pruned, lr * lam * before, 0.0), rtol=0, atol=1e-15)
    assert torch.equal(sr[~pruned], plain[~pruned])  # kept weights: no SR-STE term


# ------------------------------------------------------------------------------------------ the teacher
def test_teacher_is_frozen_unchanged_and_never_in_the_optimizer_or_checkpoints(tmp_path, monkeypatch):
    teacher = presets.build("tiny-unet", seed=1)
    before = state_of(teacher)
    calls, seen = [], {}
    # the student starts as a deep copy of the teacher, hook included: record which module ran
    teacher.register_forward_pre_hook(
        lambda m, a, k: calls.append((m, m.training, torch.is_grad_enabled())), with_kwargs=True
    )
    real = train_mod.make_optimizer

    def spy(model, recipe):
        seen["optimizer"], names = real(model, recipe)
        return seen["optimizer"], names

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    recipe = ft_recipe("sparsedm", **{"training.checkpoint_every": 2, "training.keep_checkpoints": 5})
    finetune(teacher, SyntheticImageTask(teacher), tmp_path / "run", recipe, progress=False, samples=False)

    ran = [(training, grad) for m, training, grad in calls if m is teacher]
    assert len(ran) == 4 and set(ran) == {(False, False)}  # every teacher forward: eval mode, no grad
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in state_of(teacher).items())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for g in seen["optimizer"].param_groups for p in g["params"]}
    student = surgeon.load(tmp_path / "run" / "model")
    for path in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints"):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata()
        n_state = len(surgeon.remove(presets.build("tiny-unet")).state_dict())
        assert sum(k.startswith("model.") for k in keys) == n_state  # the student's state, nothing more
        identity = json.loads(meta["extra"])["identity"]["teacher"]
        assert identity["sha256"] == surgeon.training.teacher.content_digest(teacher)
    assert len(sites(student)) > 0


# ------------------------------------------------------------------------------ every recipe, end to end
@pytest.mark.parametrize("name", ["one-shot", "asp", "ste", "sr-ste", "sparsedm"])
def test_every_recipe_ends_nm_valid_and_reloads_to_identical_outputs(tmp_path, name):
    teacher = presets.build("tiny-unet", seed=1)
    student = presets.build("tiny-unet", seed=1)
    summary = finetune(
        teacher,
        SyntheticImageTask(teacher),
        tmp_path / "run",
        ft_recipe(name),
        model=student,
        progress=False,
        samples=False,
    )
    rep = surgeon.report(student, nm="2:4")
    converted = [r for r in rep.rows if r.masked]
    assert converted and all(r.nm_valid for r in converted)
    nm = summary.nm
    assert nm["converted"] == len(converted) == nm["nm_valid"] and nm["layers"] == len(rep.rows)
    assert nm["left_dense"] == {"conv_in.weight": "reduction size 1 is not divisible by M=4"}
    assert nm["nm_valid_fraction"] == pytest.approx(len(converted) / len(rep.rows))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["nm"] == nm
    reloaded = surgeon.load(tmp_path / "run" / "model")
    assert torch.equal(forward(reloaded), forward(student))
    assert summary.steps == (0 if name == "one-shot" else 4)
    if name == "one-shot":  # no training: the teacher's weights, pruned
        kept = {f: s.effective() for f, s in sites(student).items()}
        dense = dict(teacher.named_parameters())
        assert all(torch.equal(w[w != 0], dense[f][w != 0]) for f, w in kept.items())


def test_student_model_must_match_the_teacher(tmp_path):
    with pytest.raises(SurgeonError, match="MODEL and TEACHER differ at") as e:
        finetune(
            presets.build("tiny-unet"),
            SyntheticImageTask(presets.build("tiny-unet")),
            tmp_path / "run",
            ft_recipe(),
            model=presets.build("tiny-unet-cond"),
            progress=False,
        )
    assert "copy of the teacher" in e.value.hint and not (tmp_path / "run").exists()


def test_finetune_refuses_recipes_that_are_not_nm_fine_tuning(tmp_path):
    teacher = presets.build("tiny-unet")
    with pytest.raises(SurgeonError, match="finetune runs N:M recipes; 'rigl' is rigl"):
        finetune(teacher, SyntheticImageTask(teacher), tmp_path / "a", load_recipe("rigl"))
    with pytest.raises(SurgeonError, match=r"re-initializes the weights \(init: scratch\)"):
        finetune(teacher, SyntheticImageTask(teacher), tmp_path / "b", ft_recipe("ste", init="scratch"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------- progressive stages
STAGED = {
    "training.steps": 6,
    "stages": [{"nm": "3:4", "steps": 2}, {"nm": "2:4", "steps": 4}],
    "training.checkpoint_every": 2,
    "training.keep_checkpoints": 5,
    "training.ema_decay": 0.9,
}


def test_a_stage_switch_keeps_weights_adamw_moments_and_ema(tmp_path):
    """Switching from 3:4 to 2:4 mid-run equals resuming a 3:4 run's checkpoint under 2:4: nothing is reset."""
    teacher = presets.build("tiny-unet", seed=1)
    task = SyntheticImageTask(teacher)
    staged = ft_recipe("sr-ste", **STAGED)
    finetune(teacher, task, tmp_path / "staged", staged, progress=False, samples=False)
    log = [json.loads(line) for line in (tmp_path / "staged" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "stage_switch": {"stage": 2, "from": "3:4", "to": "2:4", "steps": 4}} in log

    first = ft_recipe("sr-ste", **{**STAGED, "stages": None, "nm": "3:4"})
    finetune(teacher, task, tmp_path / "first", first, progress=False, samples=False, stop_after=2)
    second = ft_recipe("sr-ste", **{**STAGED, "stages": None, "nm": "2:4"})
    finetune(
        teacher,
        task,
        tmp_path / "second",
        second,
        progress=False,
        samples=False,
        resume=tmp_path / "first" / "checkpoints" / "step-0000002.safetensors",
    )
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "staged" / "checkpoints" / "step-0000002.safetensors"))
    # the moments at the switch are those of the 3:4 stage, nonzero where 2:4 now prunes
    w = "down_blocks.0.resnets.0.conv2.parametrizations.weight.original"
    moved = a[f"optim.{w}.exp_avg_sq"][
        surgeon.sparsity.nm_mask(a[f"model.{w}"], 3, 4) & ~surgeon.sparsity.nm_mask(a[f"model.{w}"], 2, 4)
    ]
    assert moved.numel() > 0 and bool((moved != 0).all())
    end_a = load_file(str(tmp_path / "staged" / "checkpoints" / "step-0000004.safetensors"))
    end_b = load_file(str(tmp_path / "second" / "checkpoints" / "step-0000004.safetensors"))
    assert any(k.startswith("ema.") for k in end_a)
    different = [k for k in end_a if k != "rng.torch" and not torch.equal(end_a[k], end_b[k])]
    assert not different, different[:5]  # weights, every AdamW moment and the EMA match exactly


def test_teacher_previous_learns_from_the_previous_stage(tmp_path, monkeypatch):
    teacher = presets.build("tiny-unet", seed=1)
    recipe = ft_recipe("sparsedm", **{**STAGED, "distill.teacher": "previous"})
    used = []
    real = DistillLoss.__call__

    def spy(self, model, inputs, target, weight):
        used.append(self.teacher)
        return real(self, model, inputs, target, weight)

    monkeypatch.setattr(DistillLoss, "__call__", spy)
    finetune(teacher, SyntheticImageTask(teacher), tmp_path / "run", recipe, progress=False, samples=False)
    assert used[0] is used[1] is teacher and used[2] is used[3] and used[2] is not teacher
    stage_teacher = used[2]
    assert not stage_teacher.training and not any(p.requires_grad for p in stage_teacher.parameters())
    assert {(s.parametrization.n, s.parametrization.m) for s in sites(stage_teacher).values()} == {(3, 4)}
    assert (tmp_path / "run" / "checkpoints" / "teacher-stage-2.safetensors").is_file()


# ------------------------------------------------------------------------------------- teacher references
def _diffusers_folder(tmp_path, name="dense", seed=1):
    model = presets.build("tiny-unet", seed=seed)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name / "diffusion_pytorch_model.safetensors"


def test_a_bare_teacher_file_finds_its_architecture(tmp_path):
    model, file = _diffusers_folder(tmp_path)
    expected = forward(model)
    # a config.json beside it (the diffusers layout)
    assert torch.equal(forward(surgeon.training.teacher.load_teacher(file)), expected)
    # no config: MODEL names the architecture
    alone = tmp_path / "alone" / "weights.safetensors"
    alone.parent.mkdir()
    shutil.copy(file, alone)
    assert torch.equal(forward(surgeon.training.teacher.load_teacher(alone, architecture="tiny-unet")), expected)
    # a file surgeon wrote (its config beside it)
    surgeon.save(model, tmp_path / "saved")
    assert torch.equal(
        forward(surgeon.training.teacher.load_teacher(tmp_path / "saved" / "model.safetensors")), expected
    )
    with pytest.raises(SurgeonError, match="cannot tell which model") as e:
        surgeon.training.teacher.load_teacher(alone)
    assert "pass MODEL" in e.value.hint


# ---------------------------------------------------------------------------------------- the command line
@pytest.fixture
def images(tmp_path):
    write_images(tmp_path / "images")
    return tmp_path / "images"


def test_cli_finetunes_and_inspect_reports_every_converted_layer_valid(tmp_path, images):
    _, file = _diffusers_folder(tmp_path)
    out = tmp_path / "out"
    r = invoke(
        "finetune",
        "--teacher",
        file,
        "--nm",
        "2:4",
        "--data",
        images,
        "--out",
        out,
        "--steps",
        3,
        "-b",
        4,
        "--lambda-w",
        1e-3,
        "--lambda-1",
        0.5,
        "--no-progress",
        "--no-samples",
    )
    assert r.exit_code == 0, r.output
    assert "2:4: 50 of 51 target layers are N:M-valid" in r.output and "dense: conv_in.weight" in r.output
    resolved = load_recipe(out / "recipe.yaml")
    assert (resolved.lambda_w, resolved.distill.lambda_1, resolved.distill.lambda_2) == (1e-3, 0.5, 1.0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["source"] == str(file.resolve()) and len(summary["teacher"]["sha256"]) == 64
    r = CliRunner().invoke(app, ["inspect", str(out / "model"), "--nm", "2:4", "--json"])
    rows = json.loads(r.stdout)["rows"]
    assert all(row["nm_valid"] for row in rows if row["masked"]) and sum(bool(row["masked"]) for row in rows) == 50


@pytest.mark.parametrize(
    "args, words, code",
    [
        (["--nm", "2:3:4"], "--nm: invalid N:M pattern '2:3:4'", 2),
        (["--nm", "5:4"], "need 0 < N <= M", 2),
        (["--nm", "0:4"], "need 0 < N <= M", 2),
        (["--stages", "2:4,3:4"], "stages must tighten, but 3:4 keeps as much as or more than 2:4", 1),
        (["--stages", "3:4,2:4", "--nm", "1:4"], "the last stage (2:4) must be the recipe's nm (1:4)", 1),
        (["--recipe", "asp", "--lambda-w", "0.1"], "nm_fixed does not use 'lambda_w'", 1),
    ],
)
def test_bad_patterns_and_stages(tmp_path, images, args, words, code):
    out = tmp_path / "out"
    r = invoke("finetune", "--teacher", "tiny-unet", "--data", images, "--out", out, "--steps", 4, *args)
    assert_one_error(r, words, code=code)
    assert not out.exists()


def test_bad_teachers(tmp_path, images):
    out = tmp_path / "out"
    pickle = tmp_path / "teacher.ckpt"
    pickle.write_bytes(b"\x80\x04not a safetensors file")
    assert_one_error(
        invoke("finetune", "--teacher", pickle, "--data", images, "--out", out), "is not a .safetensors file"
    )
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x80\x04not a safetensors file")
    assert_one_error(invoke("finetune", "--teacher", fake, "--data", images, "--out", out), "is not a safetensors file")
    _, file = _diffusers_folder(tmp_path)
    alone = tmp_path / "alone.safetensors"
    shutil.copy(file, alone)
    assert_one_error(invoke("finetune", "--teacher", alone, "--data", images, "--out", out), "cannot tell which model")
    assert_one_error(
        invoke("finetune", "tiny-dit", "--teacher", alone, "--data", images, "--out", out),
        "does not fit DiTTransformer2DModel",
    )
    assert_one_error(
        invoke("finetune", "tiny-unet-cond", "--teacher", "tiny-unet", "--data", images, "--out", out),
        "MODEL and TEACHER differ at",
    )
    assert not out.exists()


RESUMABLE = """\
algorithm: nm_ste
nm: '2:4'
lambda_w: 2.0e-4
init: pretrained
distill: {lambda_1: 1.0, lambda_2: 1.0}
optimizer: {lr: 1.0e-3}
training: {steps: 4, batch_size: 4, log_every: 1, checkpoint_every: 2, eval_batches: 1}
"""


def test_resume_with_a_different_teacher_is_refused(tmp_path, images):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(RESUMABLE)
    _, first = _diffusers_folder(tmp_path, "first", seed=1)
    _, second = _diffusers_folder(tmp_path, "second", seed=2)
    out = tmp_path / "out"
    common = ["--data", images, "--out", out, "--recipe", recipe, "--no-progress", "--no-samples"]
    assert invoke("finetune", "--teacher", first, *common).exit_code == 0
    listing = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = invoke("finetune", "--teacher", second, *common, "--resume", out)
    assert_one_error(r, "the checkpoint was trained with teacher", str(first.resolve()), str(second.resolve()))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == listing  # nothing written
    assert invoke("finetune", "--teacher", first, *common, "--resume", out).exit_code == 0  # the same teacher resumes


# ------------------------------------------------------------------------------------- every kind of model
def _strokes(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pts = torch.rand(8 + i % 5, 3, generator=g) * 2 - 1
        pts[:, 2] = 0
        pts[-1, 2] = 1  # pen up at the end of the stroke
        out.append(pts)
    return out


def _stroke_task():
    from surgeon.tasks.sequences import SequenceTask

    task = SequenceTask(data="synthetic")
    task._datasets = {"train": _strokes(16, 0), "val": _strokes(4, 1)}
    return task


@pytest.mark.parametrize("kind", ["dit", "latent-unet", "chirodiff", "file-class"])
def test_finetune_works_for_every_kind_of_model(tmp_path, kind):
    if kind == "dit":
        teacher, data = tiny_dit(2), str(class_folder(tmp_path / "classes", {"a": 4, "b": 4}))
    elif kind == "latent-unet":
        autoencoder = build_pipeline(tmp_path / "pipe", "vae")
        for i in range(8):
            write_png(tmp_path / "images" / f"{i}.png", 30 * i, size=16, seed=i)
        teacher, data = str(tmp_path / "pipe"), str(tmp_path / "images")
    elif kind == "chirodiff":
        teacher, data = presets.build("tiny-chirodiff"), _stroke_task()
    else:
        (tmp_path / "strokes.py").write_text(USER_MODULE)
        teacher, data = f"{tmp_path / 'strokes.py'}:StrokeGRU", _stroke_task()
    summary = finetune(
        teacher, data, tmp_path / "run", ft_recipe("sparsedm", **{"training.steps": 2}), progress=False, samples=False
    )
    nm = summary.nm
    assert nm["converted"] > 0 and nm["nm_valid"] == nm["converted"] and summary.steps == 2
    loaded = surgeon.load(tmp_path / "run" / "model", trust_code=kind == "file-class")  # the file is ours
    assert all(r.nm_valid for r in surgeon.report(loaded, nm="2:4").rows if r.masked)
    if kind == "latent-unet":  # the denoiser is fine-tuned; the pipeline's autoencoder is recorded, untouched
        assert summary.pipeline == str((tmp_path / "pipe").resolve())
        from diffusers import AutoencoderKL

        after = AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae", use_safetensors=True).state_dict()
        assert all(torch.equal(after[k], v) for k, v in autoencoder.items())
    if kind in ("chirodiff", "file-class"):  # GRU weights are N:M too
        assert any(".weight_hh_l" in f for f in sites(loaded))


def test_the_python_api_takes_a_recipe_name_and_a_pattern(tmp_path):
    teacher = presets.build("tiny-unet", seed=1)
    summary = surgeon.finetune(
        teacher, SyntheticImageTask(teacher), tmp_path / "run", "one-shot", nm="1:4", progress=False, samples=False
    )
    assert summary.recipe == "one-shot" and summary.steps == 0 and summary.nm["pattern"] == "1:4"
    assert summary.sparsity == pytest.approx(0.75, abs=0.01)  # 1 of every 4 kept, conv_in left dense
