"""The one training loop (Accelerate): DDPM ε-objective, AdamW, EMA, checkpoints, resume, algorithm hooks.

Data order and noise are pure functions of (seed, step, rank), so a resumed run repeats an uninterrupted one
bit for bit, and every process sees its own shard of each global batch. The loop is the same for dense, static,
dynamic (RigL/MagRan) and N:M runs; algorithms act only at the hook points named in surgeon.algorithms.base.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from surgeon.algorithms import ALGORITHMS
from surgeon.data.sampler import BatchSampler
from surgeon.errors import Interrupted, SurgeonError, brief
from surgeon.evaluation.heldout import heldout_loss
from surgeon.io.atomic import atomic_path, write_error
from surgeon.masking.measure import measure
from surgeon.masking.shards import model_is_sharded
from surgeon.masking.zeroing import zero_at_
from surgeon.progress import TrainProgress
from surgeon.recipe import Recipe
from surgeon.seeding import derive_seed, generator, own_rng
from surgeon.tasks.base import EpsilonLoss, Task, to_device
from surgeon.training import checkpoint as ckpt
from surgeon.training import fsdp
from surgeon.training.ema import EMA


@dataclass
class TrainResult:
    steps: int
    final_loss: float  # mean training loss over the last log interval
    val_loss: float | None  # held-out denoising loss with fixed noise
    seconds: float
    seconds_per_step: float
    mask_updates: list[dict] = field(default_factory=list)


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """CPU-only machines run several processes over gloo (``accelerate launch --multi_gpu`` alone would not)."""
    refuse_sharded_training()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


_DDP = "train with DDP: accelerate launch --multi_gpu --num_processes N (every rank holds the whole model)"
_FSDP2 = "accelerate launch --use_fsdp --fsdp_version 2 --num_processes N (GPUs)"


def refuse_sharded_training(accelerator: Accelerator | None = None) -> None:
    """Refuse, before training starts, a requested run that would come up as something else, and the sharding
    surgeon does not support: never a run that silently becomes something else.

    FSDP2 (``accelerate launch --use_fsdp --fsdp_version 2``, or a model the caller sharded with ``fully_shard``)
    trains. Accelerate enables FSDP only on accelerators, so on CPU ``--use_fsdp`` would quietly run plain DDP;
    FSDP1 flattens parameters, which hides the masked tensors; DeepSpeed ZeRO keeps its own fp32 copy of the
    weights, which a mask update never reaches.
    """
    import os

    from accelerate.utils import DistributedType, parse_flag_from_env

    kind = accelerator.distributed_type if accelerator is not None else None
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or kind == DistributedType.DEEPSPEED:
        raise SurgeonError(
            "surgeon does not train under DeepSpeed: ZeRO keeps its own fp32 copy of the weights, "
            "so pruned weights would come back after a mask update",
            f"shard with FSDP2 instead: {_FSDP2}; or {_DDP}",
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") or kind == DistributedType.FSDP:
        if not torch.cuda.is_available() and kind != DistributedType.FSDP:
            raise SurgeonError(
                "FSDP was requested (--use_fsdp), but Accelerate enables FSDP only on GPUs: "
                "this run would silently be plain DDP",
                "drop --use_fsdp to train with DDP on CPU (accelerate launch --multi_gpu --num_processes N)",
            )
        if kind == DistributedType.FSDP:
            version = str(accelerator.state.fsdp_plugin.fsdp_version)
        else:  # what `accelerate launch --fsdp_version` sets; Accelerate's default is FSDP1
            version = os.environ.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise SurgeonError(
                "surgeon trains under FSDP2 only: FSDP1 flattens the parameters, which hides the masked tensors",
                f"launch with --fsdp_version 2: {_FSDP2}",
            )


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, recipe: Recipe) -> tuple[torch.optim.Optimizer, list[str]]:
    named = trainable(model)
    o = recipe.optimizer
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    params = [p for _, p in named]
    # Fused AdamW (one kernel per tensor) wherever torch has one. The per-op path's sqrt runs 2-3.5x slower on
    # zeros, which a masked weight's second moment holds at every pruned position: on SD-1.5's UNet (860M, CPU,
    # 1 thread) one step took 5.37 s per-op vs 1.09 s fused dense, and 7.53 s vs 1.02 s masked at S = 0.5.
    try:
        opt = torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # a parameter of a device or dtype without the fused kernel
        opt = torch.optim.AdamW(params, **kwargs)
    return opt, [n for n, _ in named]


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, positions: torch.Tensor) -> None:
    """Zero every per-element state tensor (AdamW exp_avg, exp_avg_sq, ...) of ``param`` at ``positions`` (whole;
    a sharded state tensor zeroes its own part)."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            zero_at_(value, positions)


@own_rng()  # the loop seeds the global RNG per step (dropout inside the model); the caller's state comes back
def train(
    model: nn.Module,
    task: Task,
    recipe: Recipe,
    out_dir: str | Path,
    objective=None,
    resume=None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    identity: dict | None = None,
) -> TrainResult:
    """Train ``model`` (already injected) in place. ``stop_after`` ends early after that many steps (tests).

    ``identity`` (JSON values, e.g. the teacher's reference and content digest) is recorded in every checkpoint; a
    resume whose identity differs is refused before anything is written.
    """
    t = recipe.training
    out_dir = Path(out_dir)
    acc = accelerator or make_accelerator(t.mixed_precision)
    refuse_sharded_training(acc)
    device = acc.device
    model.to(device).train()
    objective = (objective or EpsilonLoss(task)).to(device)

    algorithm = ALGORITHMS[recipe.algorithm](recipe, t.steps)
    optimizer, param_names = make_optimizer(model, recipe)
    # FSDP2 (Accelerate's) shards here and gives the optimizer the shards: what holds or restores weight-shaped
    # state (EMA, a checkpoint) comes after, laid out as the parameters are
    wrapped, optimizer = fsdp.prepare(acc, model, optimizer)
    fsdp.check_supported(model, objective)
    ema = EMA(model, t.ema_decay) if t.ema_decay else None
    name_of = {id(p): n for n, p in model.named_parameters()}

    step = 0
    # (step, loss) per micro-batch since the last log line: kept as tensors (no host sync per step), checkpointed
    window: list[tuple[int, torch.Tensor]] = []
    if resume is not None:
        step, algo_state, extra = ckpt.load_checkpoint(
            resume, model, optimizer.optimizer, param_names, ema, algorithm=recipe.algorithm, steps=t.steps
        )
        ckpt.check_identity(extra.get("identity") or {}, identity or {})
        algorithm.load_state_dict(algo_state)
        objective.load_state_dict(extra.get("objective", {}), model)  # the previous stage's teacher, when in use
        unlogged = extra.get("loss_window", torch.zeros(0)).to(device).unbind()
        window = list(zip(extra.get("loss_window_steps", []), unlogged))
    algorithm.setup(model, acc)
    sharded = model_is_sharded(model)
    data = task.dataset("train")
    sampler = BatchSampler(len(data), t.batch_size, t.seed, acc.process_index, acc.num_processes)

    ckpt_dir = out_dir / "checkpoints"
    log_path = out_dir / "metrics.jsonl"
    if resume is None and ckpt.list_checkpoints(ckpt_dir):
        raise SurgeonError(
            f"{ckpt_dir} holds checkpoints of an earlier run",
            "resume it (resume=..., --resume), or train into another folder (--force clears them)",
        )
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, step)

    def last_good() -> Path | None:
        found = ckpt.list_checkpoints(ckpt_dir)
        return found[-1] if found else None

    def check_finite(at: int, weights: bool) -> None:
        """A non-finite loss (or weight) ends the run naming the step; no checkpoint of a diverged model is written."""
        losses = torch.stack([loss for _, loss in window]).float() if window else torch.zeros(0, device=device)
        steps_of = torch.tensor([s for s, _ in window], dtype=torch.long, device=losses.device)
        never = t.steps + 1
        first_bad = torch.where(torch.isfinite(losses), never, steps_of).min() if window else torch.tensor(never)
        if acc.num_processes > 1:  # every process stops together, at the first step any of them saw diverge
            first_bad = acc.gather(first_bad.reshape(1).to(device)).min()
        if int(first_bad) != never:
            raise Diverged(
                f"training diverged: the loss is not finite at step {int(first_bad)}",
                _diverged_hint(recipe, last_good()),
            )
        if weights and not fsdp.all_finite(acc, [p for _, p in trainable(model)]):
            raise Diverged(
                f"training diverged: the weights are not finite after step {at}", _diverged_hint(recipe, last_good())
            )

    def save(at: int) -> Path:
        check_finite(at, weights=True)
        path = ckpt_dir / f"step-{at:07d}.safetensors"
        if acc.is_main_process or sharded:  # a sharded model is gathered by every rank; the main one writes
            unlogged = torch.stack([loss for _, loss in window]) if window else None
            ckpt.save_checkpoint(
                path,
                at,
                model,
                optimizer.optimizer,
                param_names,
                algorithm.state_dict(),
                ema,
                extra={
                    "loss_window_steps": [s for s, _ in window],
                    "objective": objective.state_dict(),
                    "identity": identity or {},
                },
                algorithm=recipe.algorithm,
                loss_window=unlogged,
                write=acc.is_main_process,
            )
        if acc.is_main_process:
            ckpt.prune_checkpoints(ckpt_dir, t.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    end = t.steps if stop_after is None else min(t.steps, step + stop_after)
    bar = TrainProgress(
        t.steps, start=step, enabled=progress and acc.is_main_process, label=recipe.name or recipe.algorithm
    )
    last_loss = math.nan
    started = time.perf_counter()
    first_step = step
    with bar, _deferred_interrupt() as interrupted:
        while step < end:
            step += 1  # steps count from 1: "after every ΔT_e-th step"
            # randomness inside the model (dropout, DiT's label dropout) is a function of (seed, step, rank) too
            torch.manual_seed(derive_seed(t.seed, step, acc.process_index, 1))
            stage = algorithm.stage_starting_at(step)
            if stage is not None:  # progressive N:M: a tighter pattern from this step on
                objective.begin_stage(stage, model, out_dir, acc)  # teacher: previous takes the model as it is now
                event = algorithm.stage_event(stage)
                _log(acc, log_path, {"step": step, "stage_switch": event})
                bar.note(f"step {step}: stage {event['stage']}, {event.get('from')} → {event.get('to')}")
            algorithm.begin_step(step)
            for micro in range(t.grad_accum):
                idx = sampler.indices((step - 1) * t.grad_accum + micro)
                batch = task.collate([data[i] for i in idx])
                gen = generator(t.seed, step, micro, acc.process_index)
                inputs, target, weight = task.noisy_batch(to_device(batch, device), gen)
                sync = fsdp.no_sync(acc, wrapped, accumulating=micro < t.grad_accum - 1)
                with sync, acc.autocast(), _first_forward(step == first_step + 1 and micro == 0, inputs):
                    loss = objective(wrapped, inputs, target, weight)
                acc.backward(loss / t.grad_accum)
                window.append((step, loss.detach()))  # no host sync per step; read at log time
            algorithm.after_backward(step)
            if not algorithm.skip_optimizer_step(step):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            resets = algorithm.after_optimizer_step(step)
            for fqn, positions in resets.items():
                param = algorithm.sites[fqn].original
                zero_optimizer_state(optimizer.optimizer, param, positions)
                if ema is not None:
                    ema.reset({name_of[id(param)]: positions})
            if ema is not None:
                ema.update(model)
            if step % t.log_every == 0 or step == end:
                check_finite(step, weights=step == end)
                mean_loss = torch.stack([loss for _, loss in window]).float().mean().item()
                record = {
                    "step": step,
                    "loss": mean_loss,
                    "sparsity": measure(model).sparsity,
                    "lr": optimizer.param_groups[0]["lr"],
                    "time": time.perf_counter() - started,
                }
                if resets:
                    record["mask_update"] = algorithm.history[-1]
                _log(acc, log_path, record)
                bar.update(step, record["loss"], record["sparsity"])
                last_loss, window = record["loss"], []
            elif resets:
                _log(acc, log_path, {"step": step, "mask_update": algorithm.history[-1]})
            if step % t.checkpoint_every == 0 and step < t.steps:
                save(step)
            if interrupted():
                path = save(step)
                raise Interrupted(
                    f"interrupted after step {step}; checkpoint saved to {path}", f"resume with --resume {path}"
                )
    seconds = time.perf_counter() - started
    if ema is not None:
        ema.copy_to(model)
    # the plain ε-loss, whatever the training objective: comparable across recipes (a teacher term would not be)
    val = heldout_loss(model, task, EpsilonLoss(task), t.batch_size, t.eval_batches, t.seed)
    done = max(step - first_step, 1)
    return TrainResult(step, last_loss, val, seconds, seconds / done, list(getattr(algorithm, "history", [])))


@contextmanager
def _first_forward(first: bool, inputs):
    """The run's first forward pass is where a model that does not fit the task fails: name that, one line."""
    if not first:
        yield
        return
    try:
        yield
    except SurgeonError:
        raise
    except Exception as e:
        named = inputs.items() if isinstance(inputs, dict) else []
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in named if torch.is_tensor(v))
        raise SurgeonError(
            f"the model failed on its first training batch ({shapes}): {type(e).__name__}: {brief(e)}",
            "MODEL must be a denoiser taking the task's inputs, e.g. forward(x_t, t) returning ε̂ shaped like x_t",
        ) from e


class Diverged(SurgeonError):
    """The loss or the weights stopped being finite; the run ends and keeps its last good checkpoint."""


def _diverged_hint(recipe: Recipe, checkpoint: Path | None) -> str:
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
    return f"lower the learning rate (--lr, now {recipe.optimizer.lr:g}) and start again; {kept}"


@contextmanager
def _deferred_interrupt():
    """Ctrl-C ends the run at the next step boundary (so the checkpoint is consistent); a second Ctrl-C aborts."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def _log(acc: Accelerator, path: Path, record: dict) -> None:
    if acc.is_main_process:
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: named, with the last checkpoint to resume from
            raise write_error(path, e) from e


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint so the log reads like one uninterrupted run. A partial last
    line (a kill mid-write leaves one) is dropped too; a damaged line elsewhere is an error, not silently lost."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise SurgeonError(
                f"{path} line {i + 1} is not JSON ({e.msg})", "repair or delete the damaged line, then resume again"
            ) from e
        if record.get("step", 0) <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
