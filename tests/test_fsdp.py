"""FSDP2 over two CPU processes (gloo): the same run as DDP, sharded.

Accelerate enables FSDP only on GPUs, so the script shards the model itself with torch's ``fully_shard`` and hands
it to the one training loop, which is the path ``accelerate launch --use_fsdp --fsdp_version 2`` takes after
``Accelerator.prepare``. For Static, RigL, MagRan and SR-STE N:M the sharded run must match the DDP run: masks, mask
updates and counts exactly; pruned weights exactly 0 in every forward and at the end; losses, weights, EMA and
checkpoints to rounding (below). A resumed sharded run ends bit for bit where the uninterrupted one does.

Rounding: FSDP2's gradients differ from DDP's in the last bits (measured after one backward: at most 2e-9
absolute, in 40 of the 144 tensors of tiny-unet): its autograd hooks change the order in which fp32 partial
gradients are summed. AdamW divides by the gradients' own scale, so a weight whose gradient is nearly all rounding
moves by a noisy fraction of the learning rate: the weights, moments and EMA agree to 1e-5 (1 % of one step at lr
1e-3), the attention key biases to 1e-4: their true gradient is 0 (softmax ignores a shift shared by every key).
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch
from helpers_train import PYTHON, subprocess_env
from safetensors.torch import load_file

SCRIPT = r"""
import json, sys
import torch
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from helpers_train import SyntheticImageTask, save_state, small_recipe, tiny_model
from surgeon.masking.inspection import report
from surgeon.masking.measure import measure
from surgeon.masking.shards import gathered, is_sharded
from surgeon.masking.surgery import sites
from surgeon.training.loop import train
from surgeon.training.run import Source, execute

out = sys.argv[1]
acc = Accelerator(cpu=True)
mesh = init_device_mesh("cpu", (acc.num_processes,))
rank = acc.process_index


def shard(model):
    for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(is_sharded(p) for p in model.parameters())
    return model


def watch(model, leaks):
    # every forward reads the stored W: at pruned positions it must be exactly 0 (checked on the gathered W)
    for fqn, site in sites(model).items():
        if site.is_nm:
            continue
        def check(module, args, site=site, fqn=fqn):
            w = site.original
            assert not is_sharded(w), "the forward must see the gathered weight"
            if bool((w.detach()[~site.parametrization.mask] != 0).any()):
                leaks.append(fqn)
        site.module.register_forward_pre_hook(check)


def run(name, kind, resume=None, stop_after=None, tag=""):
    changes = {"training.steps": 4, "training.batch_size": 4, "training.ema_decay": 0.9,
               "training.checkpoint_every": 2, "training.keep_checkpoints": 0}
    if name in ("rigl", "magran"):
        changes["dst.delta_t"] = 2
    recipe = small_recipe(name, **changes)
    model = tiny_model(recipe)
    if kind == "fsdp":
        shard(model)
    leaks = []
    watch(model, leaks)
    folder = f"{out}/{name}-{kind}{tag}"
    task = SyntheticImageTask(model)
    if name in ("static", "sr-ste"):  # the whole command: train, then measure, summarize, sample and save
        result = execute(Source(model), task, recipe, folder, acc, progress=False)
        updates = []
    else:
        result = train(model, task, recipe, folder, accelerator=acc, progress=False, resume=resume,
                       stop_after=stop_after)
        updates = result.mask_updates
    cost = measure(model)  # every rank: it gathers what it counts
    planned = {f: s.parametrization.layer.kept for f, s in sites(model).items() if not s.is_nm}
    rows = report(model, nm="2:4").to_dict()["rows"]  # inspect's table: effective weights, N:M validity
    with gathered(model):
        save_state(model, f"{folder}/state-rank{rank}.safetensors")
    info = {"final": result.final_loss, "val": result.val_loss, "updates": updates, "leaks": leaks,
            "layers": [[r.name, r.kept, r.numel] for r in cost.layers], "sparsity": cost.sparsity,
            "planned": planned, "report": rows}
    with open(f"{folder}/info-rank{rank}.json", "w") as f:
        json.dump(info, f)


for name in ("static", "rigl", "magran", "sr-ste"):
    for kind in ("ddp", "fsdp"):
        run(name, kind)
# resume: the sharded RigL run stopped after its step-2 checkpoint, continued by a freshly sharded model
run("rigl", "fsdp", stop_after=2, tag="-resumed")
run("rigl", "fsdp", resume=f"{out}/rigl-fsdp-resumed/checkpoints/step-0000002.safetensors", tag="-resumed")
"""

NAMES = ("static", "rigl", "magran", "sr-ste")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "two_ranks.py"
    script.write_text(SCRIPT)
    env = subprocess_env()
    env["HF_HOME"] = str(tmp / "hf")  # no user accelerate config file can change the launch
    cmd = [str(PYTHON), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), str(script), str(tmp)]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def _info(folder, rank):
    return json.loads((folder / f"info-rank{rank}.json").read_text())


def _losses(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["sparsity"]) for r in map(json.loads, lines) if "loss" in r]


def _same(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _apart(a: dict, b: dict) -> list[str]:
    """Tensors further apart than rounding explains (module docstring); bool and integer ones must be equal."""
    assert a.keys() == b.keys()
    far = []
    for k in a:
        if not a[k].is_floating_point():
            close = torch.equal(a[k], b[k])
        else:
            close = torch.allclose(a[k], b[k], rtol=0, atol=1e-4 if "to_k.bias" in k else 1e-5)
        if not close:
            far.append(k)
    return far


def _pruned_nonzero(state: dict) -> list[str]:
    """Weights under a fixed mask with a nonzero stored value where the mask prunes (N:M keeps W dense)."""
    bad = []
    for key, mask in state.items():
        module, _, name = key[5:].rpartition(".")
        if key.startswith("mask.") and f"state.{module}.parametrizations.{name}.0.mask" in state:
            stored = state[f"state.{module}.parametrizations.{name}.original"]
            if bool((stored[~mask.bool()] != 0).any()):
                bad.append(key)
    return bad


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_trains_as_ddp_does(runs, name):
    ddp, fsdp = runs / f"{name}-ddp", runs / f"{name}-fsdp"
    a_log, b_log = _losses(ddp), _losses(fsdp)
    assert [s for s, _, _ in b_log] == [s for s, _, _ in a_log] == [1, 2, 3, 4]
    assert [sp for _, _, sp in b_log] == [sp for _, _, sp in a_log]
    assert all(abs(x - y) <= 1e-6 * abs(x) for (_, x, _), (_, y, _) in zip(a_log, b_log))
    reference = load_file(str(ddp / "state-rank0.safetensors"))
    for rank in range(2):
        a, b = _info(ddp, rank), _info(fsdp, rank)
        assert b["updates"] == a["updates"] and b["layers"] == a["layers"] and b["sparsity"] == a["sparsity"]
        assert b["report"] == a["report"] and len(b["report"]) >= len(b["layers"]) > 0
        assert abs(b["val"] - a["val"]) <= 1e-6 * abs(a["val"])
        assert not a["leaks"] and not b["leaks"]  # no pruned weight reached a forward, on either rank
        # weights (the EMA copied in), mask buffers and masks, gathered: the same on both ranks and as DDP's
        state = load_file(str(fsdp / f"state-rank{rank}.safetensors"))
        masks = {k: v for k, v in state.items() if k.startswith("mask.")}
        assert masks and not _same(masks, {k: reference[k] for k in masks})
        assert not _apart(state, reference)
        assert not _pruned_nonzero(state)
    if name in ("rigl", "magran"):
        assert [u["step"] for u in _info(fsdp, 0)["updates"]] == [2, 4]
        assert sum(u["regrown"] for u in _info(fsdp, 0)["updates"]) > 0  # the masks did move
    # the checkpoint holds whole tensors (weights, AdamW moments, EMA, mask buffers), as DDP's does
    step2 = "checkpoints/step-0000002.safetensors"
    assert not _apart(load_file(str(fsdp / step2)), load_file(str(ddp / step2)))


@pytest.mark.parametrize("name", ["static", "sr-ste"])
def test_the_command_saves_measures_and_samples_a_sharded_model_as_a_whole(runs, name):
    from surgeon.formats.packed import load

    ddp, fsdp = runs / f"{name}-ddp", runs / f"{name}-fsdp"
    a, b = (json.loads((f / "summary.json").read_text()) for f in (ddp, fsdp))
    for key in ("sparsity", "params_total", "params_kept", "flops_forward", "flops_train", "nm"):
        assert a[key] == b[key], key
    assert (fsdp / "samples.png").is_file()
    a, b = (load(f / "model").state_dict() for f in (ddp, fsdp))
    assert not _apart(a, b)


def test_fsdp2_counts_are_exact(runs):
    for name in ("static", "rigl", "magran"):
        info = _info(runs / f"{name}-fsdp", 0)
        kept = {n: k for n, k, _ in info["layers"]}
        assert info["planned"] and all(kept[f] == k for f, k in info["planned"].items())
    info = _info(runs / "sr-ste-fsdp", 0)
    assert info["layers"] and all(k * 2 == n for _, k, n in info["layers"])  # 2:4 keeps half of every layer


def test_a_resumed_fsdp2_run_ends_as_the_uninterrupted_one(runs):
    resumed, whole = runs / "rigl-fsdp-resumed", runs / "rigl-fsdp"
    assert _losses(resumed) == _losses(whole)
    a, b = _info(resumed, 0), _info(whole, 0)
    assert a["final"] == b["final"] and a["val"] == b["val"] and a["updates"] == b["updates"] and not a["leaks"]
    for rank in range(2):
        state = load_file(str(resumed / f"state-rank{rank}.safetensors"))
        assert not _same(state, load_file(str(whole / "state-rank0.safetensors")))


def test_a_previous_stage_teacher_is_refused_for_a_sharded_model(monkeypatch):
    # the teacher of `teacher: previous` is a deepcopy of the student, which FSDP2 refuses for sharded modules
    from helpers_train import SyntheticImageTask

    from surgeon.errors import SurgeonError
    from surgeon.models import presets
    from surgeon.training import fsdp
    from surgeon.training.objectives import DistillLoss

    model = presets.build("tiny-unet", seed=0)
    task = SyntheticImageTask(model)
    previous = DistillLoss(task, presets.build("tiny-unet", seed=1), previous=True)
    fsdp.check_supported(model, previous)  # an unsharded model: DDP copies it as before
    monkeypatch.setattr(fsdp, "model_is_sharded", lambda m: True)
    fsdp.check_supported(model, DistillLoss(task, presets.build("tiny-unet", seed=1)))  # a fixed teacher trains
    with pytest.raises(SurgeonError, match="FSDP2 cannot copy a sharded model") as e:
        fsdp.check_supported(model, previous)
    assert "fixed teacher" in e.value.hint
