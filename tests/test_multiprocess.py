"""Two CPU processes (Accelerate, gloo) end with identical masks and weights after RigL and MagRan updates.

RigL averages its dense gradient across processes and MagRan draws the same random numbers on every process
(docs/methods.md, "Invariants"), so every rank must hold the same masks and the same weights after every update.
"""

from __future__ import annotations

import json
import socket
import subprocess

import torch
from helpers_train import PYTHON, subprocess_env
from safetensors.torch import load_file

SCRIPT = r"""
import json, sys
import torch
from accelerate import Accelerator
from helpers_train import SyntheticImageTask, masks_of, save_state, small_recipe, tiny_model
from surgeon.masking.surgery import sites
from surgeon.training.loop import train

out = sys.argv[1]
acc = Accelerator(cpu=True)
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
for name in ("rigl", "magran"):
    recipe = small_recipe(name, **{"training.steps": 7, "dst.delta_t": 2, "training.batch_size": 4})
    model = tiny_model(recipe)
    start = masks_of(model)
    result = train(model, SyntheticImageTask(model), recipe, f"{out}/{name}-run", accelerator=acc, progress=False)
    save_state(model, f"{out}/{name}-rank{acc.process_index}.safetensors")
    moved = sum(int((start[f] != m).sum()) for f, m in masks_of(model).items())
    # step 7 follows the last update: DDP reads each gradient after the hook masked it, none reaches a pruned weight
    leaked = sum(int(s.original[~s.mask].count_nonzero()) for s in sites(model).values())
    with open(f"{out}/{name}-rank{acc.process_index}.json", "w") as f:
        json.dump({"processes": acc.num_processes, "backend": backend, "distributed": str(acc.distributed_type),
                   "updates": result.mask_updates, "moved": moved, "leaked": leaked}, f)

from surgeon.models import presets
from surgeon.recipe import load_recipe
from surgeon.training.run import execute, make_objective, prepare, Source

# SparseDM: 3:4 for two steps, then 2:4 distilled from the 3:4 model (each rank its own teacher copy)
recipe = load_recipe("sparsedm").override(**{
    "training.steps": 4, "stages": [{"nm": "3:4", "steps": 2}, {"nm": "2:4", "steps": 2}],
    "distill.teacher": "previous", "training.batch_size": 4, "training.log_every": 1, "training.eval_batches": 1,
    "optimizer.lr": 1e-3, "training.ema_decay": 0.9})
teacher, student = presets.build("tiny-unet", seed=1).requires_grad_(False), presets.build("tiny-unet", seed=1)
task = SyntheticImageTask(student)
prepare(student, recipe)
execute(Source(student), task, recipe, f"{out}/sparsedm-run", acc, make_objective(task, recipe, teacher),
        progress=False, samples=False)
save_state(student, f"{out}/sparsedm-rank{acc.process_index}.safetensors")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_end_with_identical_masks_and_weights(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    env = subprocess_env()
    env["HF_HOME"] = str(tmp_path / "hf")  # no user accelerate config file can change the launch
    # `accelerate launch --cpu` runs a single process; --multi_gpu is the torchrun launcher, and the script's
    # Accelerator(cpu=True) then runs the two ranks on CPU with gloo (DistributedType.MULTI_CPU)
    cmd = [
        str(PYTHON),
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("rigl", "magran"):
        info = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in range(2)]
        for i in info:
            assert i["processes"] == 2 and i["backend"] == "gloo" and i["distributed"].endswith("MULTI_CPU")
            assert [u["step"] for u in i["updates"]] == [2, 4, 6]  # ΔT_e = 2, no stop step (small_recipe)
            assert i["moved"] > 0  # the masks did change
            assert i["leaked"] == 0
        assert info[0]["updates"] == info[1]["updates"]
        a = load_file(str(tmp_path / f"{name}-rank0.safetensors"))
        b = load_file(str(tmp_path / f"{name}-rank1.safetensors"))
        assert a.keys() == b.keys() and any(k.startswith("mask.") for k in a)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: ranks differ in {different[:5]}"
    a = load_file(str(tmp_path / "sparsedm-rank0.safetensors"))
    b = load_file(str(tmp_path / "sparsedm-rank1.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    log = [json.loads(line) for line in (tmp_path / "sparsedm-run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "stage_switch" in r] == [3]
    assert (tmp_path / "sparsedm-run" / "checkpoints" / "teacher-stage-2.safetensors").is_file()
