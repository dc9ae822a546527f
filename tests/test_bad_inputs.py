"""A table-driven sweep of bad inputs across the CLI and the Python API.

Every case must end in one ``error: ...`` line and one ``hint: ...`` line (its own hint, not the catch-all's),
the right exit status (2: malformed command line, 1: bad input), no traceback, and nothing written: the files
under the working folder are the same before and after. CLI cases run in-process (typer's CliRunner) and fail
before any heavy work: the sweep takes seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import WRONG_SHAPE, assert_one_error, invoke, resign, swap_two_bits, write_images
from helpers_train import SyntheticImageTask, one_thread, small_recipe, tiny_model  # noqa: F401
from PIL import Image

import surgeon
from surgeon.errors import SurgeonError
from surgeon.training.loop import train

# ---- the folder every case runs in --------------------------------------------------------------------------------

NOT_A_MODULE = "class Net:\n    pass\n"
WRONG_INPUT = '''
import torch


class Linear3(torch.nn.Module):
    """Claims 16x16 images but multiplies by a 3x3 matrix: its forward fails on the first batch."""

    def __init__(self):
        super().__init__()
        self.config = {"sample_size": 16, "in_channels": 1}
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, t):
        return self.lin(x)
'''
PAYLOAD = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"

RECIPES = {
    "bad-syntax.yaml": "algorithm: rigl\nsparsity: [0.5\n",
    "unknown-key.yaml": "algorithm: rigl\nsparsityy: 0.5\n",
    "nan-power.yaml": "algorithm: rigl\npower_scale: .nan\n",
    "inf-lr.yaml": "algorithm: rigl\noptimizer: {lr: .inf}\n",
    "betas.yaml": "algorithm: rigl\noptimizer: {betas: [1.0, 0.9]}\n",
    "weight-decay.yaml": "algorithm: rigl\noptimizer: {weight_decay: -0.01}\n",
    "timesteps.yaml": "algorithm: rigl\ndiffusion: {timesteps: 0}\n",
    "schedule.yaml": "algorithm: rigl\ndiffusion: {beta_schedule: cubic}\n",
    "not-a-mapping.yaml": "- rigl\n- static\n",
    "algorithm.yaml": "algorithm: lottery\n",
    "steps-string.yaml": "algorithm: rigl\ntraining: {steps: many}\n",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    write_images(root / "images", n=16)  # as many as the default batch size
    (root / "empty").mkdir()
    (root / "runs").mkdir()
    (root / "file.txt").write_text("not a folder")
    (root / "net.py").write_text(NOT_A_MODULE)
    (root / "wrong_shape.py").write_text(WRONG_SHAPE)
    (root / "wrong_input.py").write_text(WRONG_INPUT)
    (root / "evil.py").write_text(PAYLOAD)
    for name, text in RECIPES.items():
        (root / name).write_text(text)
    # a sparse model saved by surgeon, and a damaged copy of it (two mask bits swapped)
    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.5), init="random")
    surgeon.save(model, root / "saved")
    surgeon.save(model, root / "damaged")
    surgeon.save(model, root / "bad-config-values")
    config = json.loads((root / "bad-config-values" / "config.json").read_text())
    (root / "bad-config-values" / "config.json").write_text(json.dumps({**config, "block_out_channels": "abc"}))
    swap_two_bits(root / "damaged" / "model.safetensors", f"{next(iter(surgeon.masking.surgery.sites(model)))}.mask")
    # a folder whose config names a Python file: loading it must not run it
    evil = torch.nn.Module()
    evil.conv = torch.nn.Conv2d(1, 1, 3)
    surgeon.save(evil, root / "evil-model")
    (root / "evil-model" / "config.json").write_text(
        json.dumps({"_surgeon_class": f"{root / 'evil.py'}:Net", "_surgeon_init": {}})
    )
    # diffusers folders: pickled weights only; a config that is not JSON
    surgeon.load_model("tiny-unet").save_pretrained(root / "pickled", safe_serialization=False)
    (root / "broken-config").mkdir()
    (root / "broken-config" / "config.json").write_text("{not json")
    # an interrupted rigl run with a checkpoint at step 2
    recipe = small_recipe("rigl", **{"training.steps": 4, "training.checkpoint_every": 2, "training.batch_size": 2})
    trained = tiny_model(recipe)
    train(trained, SyntheticImageTask(trained), recipe, root / "run", progress=False, stop_after=2)
    # truncated files: a model, a training checkpoint
    (root / "truncated.safetensors").write_bytes((root / "saved" / "model.safetensors").read_bytes()[:100])
    (root / "torn-run" / "checkpoints").mkdir(parents=True)
    checkpoint = (root / "run" / "checkpoints" / "step-0000002.safetensors").read_bytes()
    (root / "torn-run" / "checkpoints" / "step-0000002.safetensors").write_bytes(checkpoint[: len(checkpoint) // 2])
    _second_pass_inputs(root, model)
    return root


def _pipeline(folder: Path) -> Path:
    surgeon.load_model("tiny-unet").save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "x"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _edit_header(folder: Path, **entries: str) -> None:
    """Rewrite header entries of a saved folder, digests left as they were (a damaged or hostile file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        raw = dict(f.metadata())
    save_file(load_file(file), str(file), metadata={**raw, **entries})


CORRUPT_HEADERS = {  # entry → (raw JSON text, words of the error)
    "tensors-list": ("tensors", "[]", "tensors is a list, expected a JSON object"),
    "tensors-deep": ("tensors", "[" * 100_000 + "]" * 100_000, "tensors is nested deeper than 64 levels"),
    "tensors-nan": ("tensors", '{"conv_in.weight": {"shape": [NaN]}}', "NaN is not a JSON number"),
    "tensors-huge-number": ("tensors", '{"conv_in.weight": {"kept": 1e999}}', "1e999 is not a finite number"),
    "tensors-entry-string": ("tensors", '{"conv_in.weight": "8x1x3x3"}', "entry conv_in.weight is not a JSON object"),
    "tensors-shape-float": (
        "tensors",
        '{"w": {"shape": [8.5], "dtype": "float32", "kept": 1, "kind": "conv"}}',
        "shape",
    ),
    "tensors-kept-negative": (
        "tensors",
        '{"w": {"shape": [8], "dtype": "float32", "kept": -1, "kind": "conv"}}',
        "kept -1",
    ),
    "tensors-nm-three": (
        "tensors",
        '{"w": {"shape": [8], "dtype": "float32", "kept": 1, "kind": "conv", "nm": [1, 2, 3]}}',
        "nm [1, 2, 3]",
    ),
    "plan-list": ("plan", "[1, 2]", "plan is a list, expected a JSON object or null"),
    "recipe-number": ("recipe", "5", "recipe is a number, expected a JSON object or null"),
    "extra-string": ("extra", '"x"', "extra is a string, expected a JSON object"),
    "digests-list": ("digests", "[]", "digests is a list, expected a JSON object"),
    "format-version-superscript": ("format_version", "\u00b2", "format version"),
    "config-not-json": ("tensors", "{not json", "tensors is not valid JSON"),
    "plan-malformed": ("plan", '{"layers": []}', "plan is malformed"),
}


def _second_pass_inputs(root: Path, model) -> None:
    """What the second audit tried: links out of folders, records that walk through modules, edited configs and
    headers, outputs that are inputs or links, images that do not decode."""
    import os

    (root / "secret.txt").write_text("PRIVATE KEY")
    os.symlink(root / "secret.txt", _pipeline(root / "pipe-leak") / "scheduler" / "notes.txt")
    os.symlink(root / "runs", _pipeline(root / "pipe-dir-leak") / "extras")
    pipe = _pipeline(root / "pipe-loop")
    os.symlink("b", pipe / "scheduler" / "a")
    os.symlink("a", pipe / "scheduler" / "b")
    surgeon.save(model, root / "linked-config")
    (root / "linked-config" / "config.json").rename(root / "moved-config.json")
    os.symlink(root / "moved-config.json", root / "linked-config" / "config.json")
    surgeon.save(model, root / "linked-weights")
    (root / "linked-weights" / "model.safetensors").rename(root / "moved.safetensors")
    os.symlink(root / "moved.safetensors", root / "linked-weights" / "model.safetensors")
    surgeon.load_model("tiny-unet").save_pretrained(root / "diffusers-linked", safe_serialization=True)
    weights = root / "diffusers-linked" / "diffusion_pytorch_model.safetensors"
    weights.rename(root / "moved-diffusers.safetensors")
    os.symlink(root / "moved-diffusers.safetensors", weights)
    for name, spec in (
        ("walk-chirodiff", "surgeon.models.chirodiff:torch.nn.Linear"),
        ("walk-diffusers", "diffusers.models.modeling_utils:torch.nn.Linear"),
        ("walk-presets", "surgeon.models.presets:nn.Linear"),
    ):
        surgeon.save(torch.nn.Linear(3, 3), root / name)
        config = {"_surgeon_class": spec, "_surgeon_init": {"in_features": 3, "out_features": 3}}
        (root / name / "config.json").write_text(json.dumps(config))
        resign(root / name)
    surgeon.save(model, root / "edited-config")
    config = json.loads((root / "edited-config" / "config.json").read_text())
    (root / "edited-config" / "config.json").write_text(json.dumps({**config, "norm_eps": 0.5}))
    surgeon.save(model, root / "edited-header")
    _edit_header(root / "edited-header", recipe='{"algorithm": "rigl"}')
    for name, (key, text, _) in CORRUPT_HEADERS.items():
        surgeon.save(model, root / f"meta-{name}")
        _edit_header(root / f"meta-{name}", **{key: text})
    surgeon.save(model, root / "runX" / "model")
    (root / "runX" / "checkpoints").mkdir()
    (root / "runX" / "checkpoints" / "step-0000002.safetensors").write_text("a checkpoint")
    (root / "link-target").mkdir()
    os.symlink("link-target", root / "out-link")
    # image folders whose every file is unusable: skipped files are counted, the first one named
    (root / "img-bomb").mkdir()
    Image.new("L", (1, 1)).save(root / "img-bomb" / "bomb.png")
    data = bytearray((root / "img-bomb" / "bomb.png").read_bytes())
    data[16:24] = (200_000).to_bytes(4, "big") * 2  # a header claiming 200000 x 200000 pixels
    (root / "img-bomb" / "bomb.png").write_bytes(bytes(data))
    (root / "img-float").mkdir()
    Image.fromarray(np.ones((16, 16), dtype=np.float32), mode="F").save(root / "img-float" / "f.tiff")
    (root / "img-truncated").mkdir()
    (root / "img-truncated" / "t.png").write_bytes((root / "images" / "00.png").read_bytes()[:40])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for p in root.rglob("*")
        if "__pycache__" not in p.parts
    }


# ---- the CLI ------------------------------------------------------------------------------------------------------


@dataclass
class Cli:
    args: str  # split on spaces; {root} is the fixture folder
    words: str  # must appear in the error line
    code: int = 1


FAST = "--data images --no-progress --no-samples"
CLI_CASES = {
    # inspect
    "inspect/no-ref": Cli("inspect", "Missing argument 'REF'", 2),
    "inspect/unknown-option": Cli("inspect tiny-unet --bogus", "No such option: --bogus", 2),
    "inspect/nm-n-above-m": Cli("inspect tiny-unet --nm 5:4", "--nm: invalid N:M pattern '5:4'", 2),
    "inspect/nm-not-a-pattern": Cli("inspect tiny-unet --nm two", "--nm: invalid N:M pattern", 2),
    "inspect/unknown-command": Cli("frobnicate", "No such command 'frobnicate'", 2),
    "inspect/unknown-ref": Cli("inspect no-such-model", "not a folder, file.py:Class, preset or hub id"),
    "inspect/mistyped-path": Cli("inspect runs/nothere", "no such folder: runs/nothere"),
    "inspect/dot-path": Cli("inspect ./nothere", "no such folder: ./nothere"),
    "inspect/missing-safetensors": Cli("inspect nothere.safetensors", "no such file: nothere.safetensors"),
    "inspect/py-without-class": Cli("inspect net.py", "name the class"),
    "inspect/py-missing": Cli("inspect missing.py:Net", "missing.py does not exist"),
    "inspect/py-not-a-module": Cli("inspect net.py:Net", "not as a torch.nn.Module class"),
    "inspect/py-no-such-class": Cli("inspect net.py:Other", "has no class Other"),
    "inspect/folder-runs-code": Cli("inspect evil-model", "names code to run"),
    "inspect/damaged": Cli("inspect damaged", "damaged file:"),
    "inspect/pickled-only": Cli("inspect pickled", "has no safetensors weights"),
    "inspect/empty-folder": Cli("inspect empty", "the folder has no config.json"),
    "inspect/config-not-json": Cli("inspect broken-config", "cannot read"),
    "inspect/config-bad-values": Cli("inspect bad-config-values", "cannot build UNet2DModel from bad-config-values"),
    "inspect/bad-regex": Cli("inspect tiny-unet --include re:(", "invalid regular expression"),
    "inspect/hub-offline": Cli("inspect someorg/somemodel", "the Hugging Face Hub is offline"),
    "inspect/nm-zero": Cli("inspect tiny-unet --nm 0:4", "need 0 < N <= M", 2),
    "inspect/truncated-file": Cli("inspect truncated.safetensors", "is not a safetensors file"),
    # sparsify: the recipe and flags, refused before any model loads
    "sparsify/unknown-recipe": Cli(f"sparsify tiny-unet --recipe lottery {FAST}", "unknown recipe 'lottery'"),
    "sparsify/recipe-missing": Cli(
        f"sparsify tiny-unet --recipe gone.yaml {FAST}", "recipe file gone.yaml does not exist"
    ),
    "sparsify/recipe-syntax": Cli(f"sparsify tiny-unet --recipe bad-syntax.yaml {FAST}", "is not valid YAML"),
    "sparsify/recipe-unknown-key": Cli(
        f"sparsify tiny-unet --recipe unknown-key.yaml {FAST}", "unknown key 'sparsityy'"
    ),
    "sparsify/recipe-nan": Cli(
        f"sparsify tiny-unet --recipe nan-power.yaml {FAST}", "'power_scale' must be a finite number"
    ),
    "sparsify/recipe-inf-lr": Cli(
        f"sparsify tiny-unet --recipe inf-lr.yaml {FAST}", "'optimizer.lr' must be a finite number"
    ),
    "sparsify/recipe-betas": Cli(
        f"sparsify tiny-unet --recipe betas.yaml {FAST}", "betas [1.0, 0.9] must both lie in [0, 1)"
    ),
    "sparsify/recipe-weight-decay": Cli(
        f"sparsify tiny-unet --recipe weight-decay.yaml {FAST}", "weight_decay must be ≥ 0"
    ),
    "sparsify/recipe-timesteps": Cli(
        f"sparsify tiny-unet --recipe timesteps.yaml {FAST}", "diffusion.timesteps must be ≥ 1"
    ),
    "sparsify/recipe-schedule": Cli(
        f"sparsify tiny-unet --recipe schedule.yaml {FAST}", "unknown beta_schedule 'cubic'"
    ),
    "sparsify/recipe-not-mapping": Cli(
        f"sparsify tiny-unet --recipe not-a-mapping.yaml {FAST}", "must be a YAML mapping"
    ),
    "sparsify/recipe-algorithm": Cli(
        f"sparsify tiny-unet --recipe algorithm.yaml {FAST}", "unknown algorithm 'lottery'"
    ),
    "sparsify/recipe-steps-string": Cli(
        f"sparsify tiny-unet --recipe steps-string.yaml {FAST}", "'training.steps' must be an integer"
    ),
    "sparsify/s-one": Cli(f"sparsify tiny-unet --s 1.0 {FAST}", "sparsity 1.0 is outside [0, 1)"),
    "sparsify/s-negative": Cli(f"sparsify tiny-unet --s -0.1 {FAST}", "is outside [0, 1)"),
    "sparsify/s-nan": Cli(f"sparsify tiny-unet --s nan {FAST}", "'sparsity' must be a finite number"),
    "sparsify/p-above-one": Cli(f"sparsify tiny-unet --p 2 {FAST}", "p=2.0 is outside [0, 1]"),
    "sparsify/delta-t-zero": Cli(f"sparsify tiny-unet --delta-t 0 {FAST}", "delta_t must be ≥ 1"),
    "sparsify/steps-negative": Cli(f"sparsify tiny-unet --steps -1 {FAST}", "training.steps must be ≥ 0"),
    "sparsify/steps-not-int": Cli(f"sparsify tiny-unet --steps abc {FAST}", "Invalid value for '--steps'", 2),
    "sparsify/lr-nan": Cli(f"sparsify tiny-unet --lr nan {FAST}", "'optimizer.lr' must be a finite number"),
    "sparsify/lr-inf": Cli(f"sparsify tiny-unet --lr inf {FAST}", "'optimizer.lr' must be a finite number"),
    "sparsify/lr-negative": Cli(f"sparsify tiny-unet --lr -1 {FAST}", "learning rate must be > 0"),
    "sparsify/batch-zero": Cli(f"sparsify tiny-unet --batch-size 0 {FAST}", "training.batch_size must be ≥ 1"),
    "sparsify/seed-65-bits": Cli(
        f"sparsify tiny-unet --seed 36893488147419103232 {FAST}", "seed 36893488147419103232 is outside"
    ),
    "sparsify/seed-negative": Cli(f"sparsify tiny-unet --seed -1 {FAST}", "seed -1 is outside"),
    "sparsify/distribution": Cli(
        f"sparsify tiny-unet --distribution gaussian {FAST}", "unknown distribution 'gaussian'"
    ),
    "sparsify/init": Cli(f"sparsify tiny-unet --init random {FAST}", "unknown init 'random'"),
    "sparsify/mixed-precision": Cli(
        f"sparsify tiny-unet --mixed-precision fp8 {FAST}", "unknown mixed_precision 'fp8'"
    ),
    "sparsify/grad-accum-zero": Cli(f"sparsify tiny-unet --grad-accum 0 {FAST}", "training.grad_accum must be ≥ 1"),
    "sparsify/ema-one": Cli(f"sparsify tiny-unet --ema 1.0 {FAST}", "ema_decay 1.0 is outside (0, 1)"),
    "sparsify/ema-zero": Cli(f"sparsify tiny-unet --ema 0 {FAST}", "ema_decay 0.0 is outside (0, 1)"),
    "sparsify/limit-zero": Cli(f"sparsify tiny-unet --limit 0 {FAST}", "limit must be a positive number"),
    "sparsify/distill-without-teacher": Cli(f"sparsify tiny-unet --recipe sparsedm {FAST}", "this run has no teacher"),
    # sparsify: the output folder and --resume, refused before any model loads
    "sparsify/out-is-a-file": Cli(f"sparsify tiny-unet --out file.txt {FAST}", "exists and is not a folder"),
    "sparsify/out-under-a-file": Cli(f"sparsify tiny-unet --out file.txt/run {FAST}", "file.txt is a file"),
    "sparsify/out-not-empty": Cli(f"sparsify tiny-unet --out saved {FAST}", "output folder saved exists"),
    "sparsify/resume-missing": Cli(f"sparsify tiny-unet --resume gone {FAST}", "checkpoint gone does not exist"),
    "sparsify/resume-no-checkpoint": Cli(f"sparsify tiny-unet --resume empty {FAST}", "no checkpoint found in empty"),
    "sparsify/resume-a-model": Cli(
        f"sparsify tiny-unet --resume saved/model.safetensors {FAST}", "is not a surgeon training checkpoint"
    ),
    "sparsify/resume-other-algorithm": Cli(
        f"sparsify tiny-unet --recipe magran --resume run {FAST}", "made by algorithm 'rigl', not 'magran'"
    ),
    "sparsify/resume-past-steps": Cli(f"sparsify tiny-unet --steps 1 --resume run {FAST}", "past the run's 1 steps"),
    "sparsify/resume-truncated": Cli(f"sparsify tiny-unet --resume torn-run {FAST}", "cannot read checkpoint"),
    "sparsify/resume-into-another-run": Cli(
        f"sparsify tiny-unet --resume run --out saved {FAST}", "holds another run than the one resumed"
    ),
    # sparsify: the model and data
    "sparsify/model-mistyped": Cli(f"sparsify runs/nothere {FAST}", "no such folder: runs/nothere"),
    "sparsify/model-runs-code": Cli(f"sparsify evil-model {FAST}", "names code to run"),
    "sparsify/model-damaged": Cli(f"sparsify damaged {FAST}", "damaged file:"),
    "sparsify/data-missing": Cli(
        "sparsify tiny-unet --data nowhere --no-progress", "no data set or folder named 'nowhere'"
    ),
    "sparsify/data-is-a-file": Cli("sparsify tiny-unet --data file.txt --no-progress", "file.txt is not a folder"),
    "sparsify/image-channels": Cli(f"sparsify tiny-unet1d {FAST}", "images can have 1 or 3 channels, got 4"),
    "sparsify/data-empty": Cli("sparsify tiny-unet --data empty --no-progress", "empty"),
    "sparsify/no-targets": Cli(f"sparsify tiny-unet --include nothing* {FAST}", "no target layers found"),
    "sparsify/forward-fails": Cli(
        f"sparsify wrong_input.py:Linear3 --steps 1 --batch-size 2 --out o {FAST}",
        "the model failed on its first training batch (x_t [2, 1, 16, 16], t [2])",
    ),
    "sparsify/wrong-output-shape": Cli(
        f"sparsify wrong_shape.py:HalfWidth --steps 1 --batch-size 2 --out o {FAST}",
        "the model's output has shape [2, 1, 16, 8]",
    ),
    # finetune
    "finetune/no-teacher": Cli(f"finetune {FAST}", "Missing option '--teacher'", 2),
    "finetune/nm-n-above-m": Cli(f"finetune --teacher tiny-unet --nm 5:4 {FAST}", "invalid N:M pattern '5:4'", 2),
    "finetune/unstructured-recipe": Cli(
        f"finetune --teacher tiny-unet --recipe rigl {FAST}", "finetune runs N:M recipes"
    ),
    "finetune/teacher-mistyped": Cli(f"finetune --teacher runs/nothere {FAST}", "no such folder: runs/nothere"),
    "finetune/teacher-runs-code": Cli(f"finetune --teacher evil-model {FAST}", "names code to run"),
    "finetune/lambda-negative": Cli(f"finetune --teacher tiny-unet --lambda-1 -1 {FAST}", "distill weights"),
    "finetune/steps-negative": Cli(f"finetune --teacher tiny-unet --steps -1 {FAST}", "training.steps must be ≥ 0"),
    "finetune/lr-nan": Cli(f"finetune --teacher tiny-unet --lr nan {FAST}", "'optimizer.lr' must be a finite number"),
    "finetune/out-not-empty": Cli(f"finetune --teacher tiny-unet --out saved {FAST}", "output folder saved exists"),
    "finetune/student-mismatch": Cli(f"finetune tiny-dit --teacher tiny-unet {FAST}", "MODEL and TEACHER differ"),
    "finetune/resume-into-another-run": Cli(
        f"finetune --teacher tiny-unet --resume run --out saved {FAST}", "holds another run than the one resumed"
    ),
    "finetune/resume-other-algorithm": Cli(
        f"finetune --teacher tiny-unet --resume run {FAST}", "made by algorithm 'rigl', not 'nm_ste'"
    ),
    # export
    "export/no-out": Cli("export tiny-unet", "Missing option '--out'", 2),
    "export/unknown-format": Cli("export tiny-unet --out o --format onnx", "unknown export format 'onnx'", 2),
    "export/unknown-dtype": Cli("export tiny-unet --out o --dtype fp8", "unknown dtype 'fp8'", 2),
    "export/truncated": Cli("export truncated.safetensors --out o", "is not a safetensors file"),
    "export/csr-half": Cli("export tiny-unet --out o --format csr --dtype fp16", "the csr format cannot hold fp16"),
    "export/layers": Cli("export tiny-unet --out o --format csr --layers some", "unknown --layers 'some'", 2),
    "export/pipeline-not-dense": Cli(
        "export tiny-unet --out o --format packed --pipeline", "--pipeline is for --format dense", 2
    ),
    "export/out-inside-model": Cli("export saved --out saved/export", "is inside the model"),
    "export/out-exists": Cli("export tiny-unet --out saved", "saved exists"),
    "export/runs-code": Cli("export evil-model --out o", "names code to run"),
    "export/not-2-4": Cli("export saved --out o --format semi-structured", "2:4"),
    "export/no-pipeline": Cli("export saved --out o --pipeline", "names no pipeline"),
    # eval
    "eval/no-model": Cli("eval", "Missing argument", 2),
    "eval/metric": Cli("eval tiny-unet --metrics fid,lpips --data images --out o", "lpips"),
    "eval/n-zero": Cli("eval tiny-unet --n 0 --data images --out o", "--n 0: FID/KID/PR need(s) at least 4 samples", 2),
    "eval/sample-steps-zero": Cli(
        "eval tiny-unet --sample-steps 0 --data images --out o", "--sample-steps 0 must be at least 1", 2
    ),
    "eval/extractor": Cli("eval tiny-unet --extractor clip --data images --out o", "clip"),
    "eval/out-not-empty": Cli("eval tiny-unet --data images --out saved", "saved exists"),
    "eval/model-mistyped": Cli("eval runs/nothere --data images --out o", "no such folder: runs/nothere"),
    # ---- the second pass (issue 17) ----
    # no file from outside a model folder travels with it or is read from it
    "export/pipeline-file-links-out": Cli("export pipe-leak --out o --pipeline", "notes.txt links outside the folder"),
    "export/pipeline-folder-links-out": Cli(
        "export pipe-dir-leak --out o --pipeline", "extras links outside the folder"
    ),
    "export/pipeline-link-loop": Cli("export pipe-loop --out o --pipeline", "symbolic link loop"),
    "inspect/config-links-out": Cli("inspect linked-config", "config.json links outside the folder"),
    "inspect/weights-link-out": Cli("inspect linked-weights", "model.safetensors links outside the folder"),
    "inspect/diffusers-weights-link-out": Cli(
        "inspect diffusers-linked", "diffusion_pytorch_model.safetensors links outside the folder"
    ),
    "sparsify/model-links-out": Cli(f"sparsify linked-config {FAST}", "config.json links outside the folder"),
    "finetune/teacher-links-out": Cli(f"finetune --teacher linked-weights {FAST}", "links outside the folder"),
    "export/model-links-out": Cli("export linked-config --out o", "config.json links outside the folder"),
    "eval/model-links-out": Cli("eval linked-config --data images --out o", "config.json links outside the folder"),
    # the trust-code allowlist checks what a record resolves to
    "inspect/walks-through-torch": Cli("inspect walk-chirodiff", "through the module torch"),
    "inspect/walks-through-diffusers": Cli("inspect walk-diffusers", "through the module torch"),
    "inspect/walks-through-presets": Cli("inspect walk-presets", "through the module torch.nn"),
    "export/walks-through-torch": Cli("export walk-chirodiff --out o", "through the module torch"),
    "sparsify/walks-through-torch": Cli(f"sparsify walk-chirodiff {FAST}", "through the module torch"),
    # an output is never its input, and never a link
    "export/out-contains-model": Cli("export runX/model --out runX --force", "output runX contains the model"),
    "export/out-is-model": Cli("export saved --out saved --force", "output saved is the model saved"),
    "export/out-inside-pipeline": Cli(
        "export pipe-leak --out pipe-leak/deploy --pipeline", "output pipe-leak/deploy is inside the model pipe-leak"
    ),
    "sparsify/out-is-model": Cli(f"sparsify saved --out saved --force {FAST}", "output saved is the model saved"),
    "sparsify/out-contains-model": Cli(f"sparsify runX/model --out runX --force {FAST}", "contains the model"),
    "finetune/out-is-teacher": Cli(
        f"finetune --teacher saved --out saved --force {FAST}", "output saved is the teacher saved"
    ),
    "finetune/out-inside-model": Cli(
        f"finetune saved --teacher tiny-unet --out saved/run {FAST}", "is inside the model"
    ),
    "eval/out-is-model": Cli("eval saved --data images --out saved --force", "output saved is the model saved"),
    "eval/out-contains-model": Cli("eval runX/model --data images --out runX --force", "contains the model"),
    "export/out-is-a-link": Cli("export tiny-unet --out out-link --force", "output out-link is a symbolic link"),
    "sparsify/out-is-a-link": Cli(f"sparsify tiny-unet --out out-link --force {FAST}", "is a symbolic link"),
    "finetune/out-is-a-link": Cli(f"finetune --teacher tiny-unet --out out-link --force {FAST}", "is a symbolic link"),
    "eval/out-is-a-link": Cli("eval tiny-unet --data images --out out-link --force", "is a symbolic link"),
    # integrity covers config.json and the header
    "inspect/config-edited": Cli("inspect edited-config", "config.json does not match the digest"),
    "inspect/header-edited": Cli("inspect edited-header", "the metadata of"),
    "export/config-edited": Cli("export edited-config --out o", "config.json does not match the digest"),
    "sparsify/config-edited": Cli(f"sparsify edited-config {FAST}", "config.json does not match the digest"),
    # every metadata value is type-checked where it is read
    **{
        f"inspect/metadata-{name}": Cli(f"inspect meta-{name}", words)
        for name, (_, _, words) in CORRUPT_HEADERS.items()
    },
    # inputs checked before work starts
    "sparsify/batch-beyond-data": Cli(
        "sparsify tiny-unet --data images --no-progress --no-samples --batch-size 1000000000",
        "batch size 1000000000 is larger than the 16 training examples",
    ),
    "sparsify/steps-beyond-64-bits": Cli(
        f"sparsify tiny-unet --steps 36893488147419103232 {FAST}", "training.steps 36893488147419103232 is beyond"
    ),
    "sparsify/batch-beyond-64-bits": Cli(
        f"sparsify tiny-unet --batch-size 36893488147419103232 {FAST}", "training.batch_size 36893488147419103232"
    ),
    "finetune/batch-beyond-data": Cli(
        "finetune --teacher tiny-unet --data images --no-progress --no-samples --batch-size 17",
        "batch size 17 is larger than the 16 training examples",
    ),
    "finetune/steps-beyond-64-bits": Cli(f"finetune --teacher tiny-unet --steps 36893488147419103232 {FAST}", "beyond"),
    "eval/batch-zero": Cli(
        "eval tiny-unet --data images --out o --batch-size 0", "--batch-size 0 must be at least 1", 2
    ),
    "eval/batch-negative": Cli("eval tiny-unet --data images --out o --batch-size -3", "--batch-size -3", 2),
    "eval/seed-negative": Cli("eval tiny-unet --data images --out o --seed -1", "--seed -1 is outside", 2),
    "eval/seed-65-bits": Cli("eval tiny-unet --data images --out o --seed 36893488147419103232", "is outside", 2),
    "eval/sample-steps-beyond-schedule": Cli(
        "eval tiny-unet --data images --out o --n 4 --sample-steps 5000", "beyond the 1000 timesteps", 2
    ),
    # every decode failure names its file; skipped files are counted
    "sparsify/data-only-a-bomb": Cli(
        "sparsify tiny-unet --data img-bomb --no-progress", "all 1 image files were skipped (e.g. bomb.png"
    ),
    "sparsify/data-only-float-images": Cli(
        "sparsify tiny-unet --data img-float --no-progress", "f.tiff: its pixel mode F is not supported"
    ),
    "sparsify/data-only-truncated": Cli("sparsify tiny-unet --data img-truncated --no-progress", "t.png"),
    "eval/data-only-a-bomb": Cli("eval tiny-unet --data img-bomb --out o", "bomb.png"),
    # paths that are not valid UTF-8 are shown, not a crash
    "inspect/path-not-utf8": Cli("inspect ./\udcffnothere", "no such folder: ./\\xffnothere"),
    "sparsify/data-not-utf8": Cli("sparsify tiny-unet --data \udcffnowhere --no-progress", "no data set or folder"),
    # reproduce
    "reproduce/budget-zero": Cli("reproduce --budget-minutes 0 --out o", "--budget-minutes 0 must be positive", 2),
    "reproduce/unknown-run": Cli("reproduce --only rigl-s0.33 --out o", "unknown run(s): rigl-s0.33", 2),
    "reproduce/out-is-a-file": Cli("reproduce --out file.txt", "file.txt"),
}


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=list(CLI_CASES))
def test_cli_bad_input(case: Cli, root, monkeypatch):
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SURGEON_DEBUG", raising=False)
    before = _snapshot(root)
    result = invoke(*case.args.replace("{root}", str(root)).split())
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert_one_error(result, case.words, code=case.code)
    assert _snapshot(root) == before, "something was written"
    assert not (root / "RAN").exists()


# ---- the Python API -------------------------------------------------------------------------------------------------


def _model():
    return surgeon.load_model("tiny-unet")


API_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "plan/model-is-a-string": (lambda r: surgeon.plan("tiny-unet", sparsity=0.5), "model must be a torch.nn.Module"),
    "plan/both": (lambda r: surgeon.plan(_model(), sparsity=0.5, nm="2:4"), "give exactly one of sparsity or nm"),
    "plan/sparsity-nan": (lambda r: surgeon.plan(_model(), sparsity=float("nan")), "sparsity nan is outside"),
    "plan/power-scale-nan": (lambda r: surgeon.plan(_model(), sparsity=0.5, power_scale=float("nan")), "power_scale"),
    "plan/distribution": (lambda r: surgeon.plan(_model(), sparsity=0.5, distribution="gauss"), "unknown distribution"),
    "plan/override-unknown": (
        lambda r: surgeon.plan(_model(), sparsity=0.5, overrides={"x": 1.0}),
        "unknown layer 'x'",
    ),
    "inject/plan-is-a-string": (lambda r: surgeon.inject(_model(), "plan"), "plan must be a surgeon.masking.plan.Plan"),
    "inject/unknown-init": (
        lambda r: surgeon.inject(_model(), surgeon.plan(_model(), sparsity=0.5), init="lucky"),
        "unknown mask init 'lucky'",
    ),
    "save/model-is-a-string": (lambda r: surgeon.save("tiny-unet", r / "o"), "model must be a torch.nn.Module"),
    "save/exists": (lambda r: surgeon.save(_model(), r / "saved"), "saved exists"),
    "save/under-a-file": (lambda r: surgeon.save(_model(), r / "file.txt" / "o"), "file.txt is a file"),
    "load/missing": (lambda r: surgeon.load(r / "nowhere"), "nowhere"),
    "load/damaged": (lambda r: surgeon.load(r / "damaged"), "damaged file:"),
    "load/runs-code": (lambda r: surgeon.load(r / "evil-model"), "names code to run"),
    "load_into/wrong-model": (
        lambda r: surgeon.load_into(surgeon.load_model("tiny-dit"), r / "saved"),
        "does not match",
    ),
    "load_model/int": (lambda r: surgeon.load_model(3), "ref must be a model reference"),
    "recipe/unknown": (lambda r: surgeon.recipe.load_recipe("lottery"), "unknown recipe 'lottery'"),
    "recipe/override-nan": (
        lambda r: surgeon.recipe.load_recipe("rigl").override(**{"optimizer.lr": float("nan")}),
        "must be a finite number",
    ),
    "export/unknown-format": (lambda r: surgeon.export(_model(), r / "o", format="onnx"), "unknown export format"),
    "sparsify/bad-data": (
        lambda r: surgeon.training.run.sparsify(
            "tiny-unet", surgeon.recipe.load_recipe("rigl"), "nowhere", r / "o", progress=False
        ),
        "no data set or folder named 'nowhere'",
    ),
}


@pytest.mark.parametrize("case", API_CASES.values(), ids=list(API_CASES))
def test_api_bad_input(case, root, monkeypatch):
    call, words = case
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(root)
    with pytest.raises(SurgeonError) as info:
        call(root)
    err = info.value
    assert words in err.message, err.message
    assert "\n" not in err.message and err.hint and "\n" not in err.hint
    assert _snapshot(root) == before, "something was written"


def test_the_sweep_covers_at_least_sixty_bad_inputs():
    assert len(CLI_CASES) + len(API_CASES) >= 60 + 131  # the second pass (issue 17) added more than 60 to the 131
    assert {key.split("/")[0] for key in CLI_CASES} >= {"inspect", "sparsify", "finetune", "export", "eval"}
