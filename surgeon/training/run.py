"""End-to-end runs behind ``surgeon sparsify`` and ``surgeon finetune`` (and the Python API).

Both commands compose the same steps; each is a few lines that say what differs::

    acc       = open_run(out, recipe, force, resume)     # check the output folder, take its one-writer lock
    source    = load_source(model)                        # the denoiser (+ frozen autoencoder of a latent pipeline)
    task      = make_run_task(source, data, recipe)       # what is denoised, with the recipe's noise schedule
    recipe    = with_task_defaults(recipe, task)          # the task's defaults written in (e.g. clip_sample)
    prepare(source.model, recipe, init)                   # re-initialize (scratch) and inject the recipe's masks
    objective = make_objective(task, recipe, teacher)     # ε-loss, or distillation from a frozen teacher
    summary   = execute(source, task, recipe, out, acc, objective, ...)   # train, save, summarize

The output folder holds ``model/`` (packed masks, docs/formats.md), ``recipe.yaml`` (fully resolved),
``metrics.jsonl``, ``samples.png``, ``loss.png``, ``summary.json`` and ``checkpoints/`` for ``--resume``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.formats import loading
from surgeon.io.atomic import atomic_path, check_apart, replaceable
from surgeon.io.classes import copy_model
from surgeon.io.lock import exclusive
from surgeon.masking.inspection import nm_coverage
from surgeon.masking.plan import plan as make_plan
from surgeon.masking.shards import gathered, model_is_sharded
from surgeon.masking.surgery import inject, sites
from surgeon.recipe import NM, Recipe, dump_recipe
from surgeon.seeding import generator, seeded
from surgeon.sparsity.patterns import nm_mask
from surgeon.tasks import Task, apply_diffusion_settings, make_task
from surgeon.training.objectives import DistillLoss, EpsilonLoss


@dataclass
class RunSummary:
    recipe: str
    algorithm: str
    sparsity: float  # measured over the masked tensors
    params_total: int  # every parameter of the denoiser
    params_kept: int  # nonzero after masking (unmasked tensors count in full)
    steps: int
    final_loss: float
    val_loss: float | None
    seconds: float
    seconds_per_step: float
    out_dir: str
    pipeline: str | None = None  # latent diffusion: the pipeline folder holding the frozen autoencoder
    flops_forward: float | None = None  # one denoiser call on one example, sparse (Evci et al.; surgeon.measure)
    flops_forward_dense: float | None = None  # the same call with every weight dense
    flops_train: float | None = None  # the whole run: per-example step FLOPs × batch × steps
    teacher: dict | None = None  # finetune: the teacher's reference and content digest
    nm: dict | None = None  # N:M runs: converted layers, how many are N:M-valid, and those left dense with why


@dataclass
class Source:
    """A loaded denoiser and what came with it."""

    model: nn.Module
    vae: nn.Module | None = None  # the frozen autoencoder of a latent-diffusion pipeline
    pipeline: str | None = None  # that pipeline's folder (absolute), recorded in the saved model


def reinitialize(model: nn.Module, seed: int) -> nn.Module:
    """Fresh weights for training from scratch (the paper's setting), in place; they depend on ``seed`` only."""
    with seeded(seed):
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(type(model), "from_config"):
            fresh = type(model).from_config(cfg)
            model.load_state_dict(fresh.state_dict())
            return model
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def check_out_dir(out: Path, force: bool, resume=None) -> None:
    """Refuse, before anything loads, an output folder that cannot be created or would replace another run.

    A non-empty folder is written only with ``force`` or when it is the run folder that ``resume`` continues.
    """
    from surgeon.training.checkpoint import run_folder

    if replaceable(out) or force:
        return
    if resume is None:
        raise SurgeonError(f"output folder {out} exists", "pass --force to overwrite, or --resume to continue a run")
    resumed = run_folder(resume)
    if out.resolve() != resumed.resolve():
        raise SurgeonError(
            f"output folder {out} holds another run than the one resumed ({resumed})",
            f"leave out --out to continue in {resumed}, or pass --force to write into {out}",
        )


def clear_stale_checkpoints(out: Path) -> None:
    """A fresh run forced over an old one starts without the old run's checkpoints: --resume must never pick them."""
    from surgeon.training.checkpoint import list_checkpoints

    for path in list_checkpoints(out / "checkpoints"):
        path.unlink()


@contextmanager
def no_empty_folder_on_failure(out: Path) -> Iterator[None]:
    """If the run fails, remove ``out`` when the run created it and it holds nothing (no log, no checkpoint)."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir():
            for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                _rmdir_if_empty(folder)
            _rmdir_if_empty(out)
        raise


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: something worth keeping (a log, a checkpoint)
        pass


# --- the shared steps ----------------------------------------------------------------------------------------------


def open_run(
    out: str | os.PathLike,
    recipe: Recipe,
    force: bool = False,
    resume=None,
    inputs: dict | None = None,
    hold: ExitStack | None = None,
) -> Accelerator:
    """Check the output folder (every process, before any process writes) and start Accelerate.

    ``inputs`` (``{what: [references]}``): what the run reads, which its output must neither be, hold nor lie
    inside. ``hold``: the run folder's one-writer lock (:mod:`surgeon.io.lock`) is taken on it by the main process,
    before anything in the folder changes, and held until the caller closes it."""
    from surgeon.training.checkpoint import check_resumable
    from surgeon.training.loop import make_accelerator

    out = Path(out)
    for what, sources in (inputs or {}).items():
        check_apart(out, what, *sources)
    check_out_dir(out, force, resume)
    if resume is not None:  # another algorithm's checkpoint, or one past --steps: refused before the model loads
        check_resumable(resume, recipe.algorithm, recipe.training.steps)
    acc = make_accelerator(recipe.training.mixed_precision)
    if hold is not None and acc.is_main_process:
        hold.enter_context(exclusive(out))
        check_out_dir(out, force, resume)  # again, now that no other writer can change it
    if force and resume is None and acc.is_main_process:
        clear_stale_checkpoints(out)
    acc.wait_for_everyone()
    return acc


def load_source(model: str | os.PathLike | nn.Module, trust_code: bool = False) -> Source:
    """A model reference (anything :func:`surgeon.load_model` takes) or a module you built."""
    if isinstance(model, nn.Module):
        return Source(model)
    ref = str(model)
    vae = loading.find_autoencoder(ref)
    return Source(
        loading.load_model(ref, trust_code=trust_code), vae, str(Path(ref).resolve()) if vae is not None else None
    )


def make_run_task(source: Source, data: str | Task, recipe: Recipe, limit: int | None = None) -> Task:
    """The task for ``source.model`` on ``data`` (a data reference or a Task you built), with the recipe's noise."""
    task = data if isinstance(data, Task) else make_task(source.model, data, vae=source.vae, limit=limit)
    apply_diffusion_settings(task, recipe.diffusion)
    n, batch = len(task.dataset("train")), recipe.training.batch_size
    if n == 0:
        raise SurgeonError(f"no training examples in {data}", "check --data")
    if batch > n:  # before the model is prepared: the sampler would refuse it only once training starts
        raise SurgeonError(
            f"batch size {batch} is larger than the {n} training examples in {data}",
            f"use --batch-size {n} or less, or train on more data",
        )
    return task


def with_task_defaults(recipe: Recipe, task: Task) -> Recipe:
    """The recipe with what the task chose for its unset fields, so ``recipe.yaml`` and the saved model record the
    sampler that was used (``diffusion.clip_sample``: on for pixel-space images, off for latents and sequences)."""
    if recipe.diffusion.clip_sample is None:
        return recipe.override(**{"diffusion.clip_sample": task.clip_sample})
    return recipe


def prepare(
    model: nn.Module, recipe: Recipe, init: str | None = None, masks: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Re-initialize (scratch) and inject the recipe's masks, in place.

    A model that already has masks (a folder saved by surgeon) continues from its own masks with ``pretrained``
    and an unstructured sparse recipe; otherwise its masks are folded in first and it starts over as the recipe
    says (``scratch``: fresh weights and masks; an N:M or dense recipe: from its effective weights). ``masks``
    (N:M recipes, from a one-shot pruned start) are ASP's fixed masks instead of the magnitude pattern.
    """
    from surgeon.algorithms import ALGORITHMS
    from surgeon.masking.surgery import fold

    init = init or recipe.init
    if sites(model):
        if init == "pretrained" and recipe.algorithm in ("static", "magran", "rigl"):
            return continue_own_masks(model, recipe)
        fold(model)
    if init == "scratch":
        reinitialize(model, recipe.training.seed)
    if recipe.algorithm == "dense":
        return model
    targets = {
        "include": recipe.include or None,
        "exclude": recipe.exclude or None,
        "dense_first": recipe.dense_first,
        "dense_last": recipe.dense_last,
    }
    if recipe.nm:
        p = make_plan(model, nm=recipe.nm, **targets)
    else:
        p = make_plan(
            model, sparsity=recipe.sparsity, distribution=recipe.distribution, power_scale=recipe.power_scale, **targets
        )
    if recipe.algorithm == "nm_fixed":  # ASP: the magnitude N:M pattern of the weights, drawn once, then fixed
        if masks is None:
            masks = {f: nm_mask(model.get_parameter(f), *lp.nm) for f, lp in p.layers.items() if lp.nm is not None}
        return inject(model, p.fixed_nm(), masks=masks)
    mask_init = "magnitude" if init == "pretrained" else ALGORITHMS[recipe.algorithm].mask_init
    return inject(model, p, init=mask_init, seed=recipe.training.seed, lambda_w=recipe.lambda_w or 0.0)


def continue_own_masks(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Keep a loaded model's masks for an unstructured sparse recipe: they must be fixed masks, not N:M ones."""
    nm = [fqn for fqn, site in sites(model).items() if site.is_nm]
    if nm:
        raise SurgeonError(
            f"the model has N:M masks (e.g. {nm[0]}); {recipe.algorithm} trains unstructured masks",
            "fine-tune it with `surgeon finetune`, or pass --init scratch to start over",
        )
    return model


def make_objective(task: Task, recipe: Recipe, teacher: nn.Module | None = None):
    """The loss the loop minimizes: the ε-objective, or SparseDM distillation when the recipe has ``distill:``."""
    if recipe.distill is None:
        return EpsilonLoss(task)
    if teacher is None:
        raise SurgeonError(
            f"recipe {recipe.name or recipe.algorithm!r} has a distill section, but this run has no teacher",
            "distill from a dense model with `surgeon finetune --teacher DENSE`, or drop distill: from the recipe",
        )
    d = recipe.distill
    return DistillLoss(task, teacher, d.lambda_1, d.lambda_2, previous=d.teacher == "previous")


def execute(
    source: Source,
    task: Task,
    recipe: Recipe,
    out: str | os.PathLike,
    acc: Accelerator,
    objective=None,
    resume=None,
    progress: bool = True,
    samples: bool = True,
    stop_after: int | None = None,
    teacher: dict | None = None,
) -> RunSummary:
    """Train ``source.model`` (prepared) in place, then write the model, recipe, samples and summary."""
    from surgeon.formats.packed import save
    from surgeon.masking.measure import measure_task
    from surgeon.training.loop import train

    out = Path(out)
    started = time.perf_counter()
    with no_empty_folder_on_failure(out):
        result = train(
            source.model,
            task,
            recipe,
            out,
            objective=objective,
            resume=resume,
            accelerator=acc,
            progress=progress,
            stop_after=stop_after,
            identity={"teacher": teacher} if teacher else None,
        )
    model = acc.unwrap_model(source.model)
    sharded = model_is_sharded(model)  # FSDP2: forward passes on every rank; what reads weights sees them gathered
    model = model if sharded else model.cpu()
    cost = measure_task(model, task)
    images = None
    if samples and recipe.training.num_samples and (sharded or acc.is_main_process):
        d, t = recipe.diffusion, recipe.training
        images = task.to_images(task.sample(model, t.num_samples, generator=generator(t.seed), steps=d.sample_steps))
    with gathered(model) if sharded else nullcontext():
        summary = RunSummary(
            recipe.name or recipe.algorithm,
            recipe.algorithm,
            cost.sparsity,
            cost.params_total,
            cost.params_kept,
            result.steps,
            result.final_loss,
            result.val_loss,
            time.perf_counter() - started,
            result.seconds_per_step,
            str(out),
            source.pipeline,
            cost.flops_sparse,
            cost.flops_dense,
            cost.run_flops(recipe, result.steps),
            teacher,
            nm_coverage(model, recipe.nm) if recipe.nm else None,
        )
        if acc.is_main_process:  # every process holds the same model; one writes it
            # the denoiser alone is saved; a latent model records the pipeline whose frozen autoencoder it needs
            save(
                model,
                out / "model",
                recipe=recipe.to_dict(),
                force=True,
                extra_metadata={"pipeline": source.pipeline, **({"teacher": teacher} if teacher else {})},
            )
    if acc.is_main_process:
        write_text(out / "recipe.yaml", dump_recipe(recipe))
        if images is not None:
            save_samples(images, out / "samples.png")
        if (out / "metrics.jsonl").is_file():
            from surgeon.evaluation.plots import loss_curve

            loss_curve(out / "metrics.jsonl", out / "loss.png", title=summary.recipe, val_loss=summary.val_loss)
        summary.seconds = time.perf_counter() - started
        write_text(out / "summary.json", json.dumps(asdict(summary), indent=2))
    acc.wait_for_everyone()
    return summary


def save_samples(images, path: Path) -> Path:
    from surgeon.data.render import render_grid

    grid = render_grid(images, nrow=max(1, int(len(images) ** 0.5)))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --- the commands ------------------------------------------------------------------------------------------------


def as_recipe(recipe: Recipe | str | os.PathLike, **changes) -> Recipe:
    """A Recipe, a shipped recipe's name or a YAML path; ``changes`` override fields (``section.field`` keys)."""
    from surgeon.recipe import load_recipe

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return recipe.override(**changes) if changes else recipe


def sparsify(
    model: str | os.PathLike | nn.Module,
    recipe: Recipe | str,
    data: str | Task,
    out: str | os.PathLike,
    init: str | None = None,
    limit: int | None = None,
    force: bool = False,
    resume=None,
    progress: bool = True,
    samples: bool = True,
    stop_after: int | None = None,
    trust_code: bool = False,
) -> RunSummary:
    """Sparse-to-sparse training (Static-DM, RigL-DM, MagRan-DM) or a dense baseline, from scratch by default.

    ``recipe``: a Recipe, a shipped name or a YAML path. ``trust_code``: see :func:`surgeon.load_model`."""
    recipe = as_recipe(recipe)
    with ExitStack() as hold:
        acc = open_run(out, recipe, force, resume, inputs={"model": [model]}, hold=hold)
        source = load_source(model, trust_code)
        task = make_run_task(source, data, recipe, limit)
        recipe = with_task_defaults(recipe, task)
        objective = make_objective(task, recipe)  # before prepare: a recipe that needs a teacher fails untouched
        prepare(source.model, recipe, init)
        return execute(
            source,
            task,
            recipe,
            out,
            acc,
            objective,
            resume=resume,
            progress=progress,
            samples=samples,
            stop_after=stop_after,
        )


def finetune(
    teacher: str | os.PathLike | nn.Module,
    data: str | Task,
    out: str | os.PathLike,
    recipe: Recipe | str = "sparsedm",
    model: str | os.PathLike | nn.Module | None = None,
    nm: str | None = None,
    limit: int | None = None,
    force: bool = False,
    resume=None,
    progress: bool = True,
    samples: bool = True,
    stop_after: int | None = None,
    trust_code: bool = False,
    init: str | os.PathLike | nn.Module | None = None,
) -> RunSummary:
    """N:M fine-tuning of a trained dense model (SparseDM): the student starts as a copy of ``teacher`` (or as
    ``model``, whose target tensors must match the teacher's) and learns from the frozen teacher if the recipe
    distills; with ``init`` (a model pruned by ``surgeon prune`` to the recipe's pattern) it starts from that
    model's mask and weights instead of magnitude, as a recipe with a ``prune:`` section does after pruning the
    student itself. ``recipe``: a Recipe, a shipped name (sparsedm, sr-ste, ste, asp, one-shot, sparsegpt-2of4,
    wanda-2of4, sparsegpt+sparsedm) or a YAML path; ``nm`` overrides its pattern. ``data``: a data reference or a Task you built. ``trust_code``: see
    :func:`surgeon.load_model`.

        surgeon.finetune("runs/dense/model", "kanjivg", "runs/sparse-2of4", nm="2:4")
    """
    from surgeon.masking.surgery import fold
    from surgeon.training.teacher import check_same_targets, content_digest, freeze, load_teacher

    recipe = as_recipe(recipe, nm=nm)
    name = recipe.name or recipe.algorithm
    if recipe.algorithm not in NM:
        raise SurgeonError(
            f"finetune runs N:M recipes; {name!r} is {recipe.algorithm}",
            "use --recipe sparsedm, sr-ste, ste, asp or one-shot; sparse training from scratch is `surgeon sparsify`",
        )
    if recipe.init != "pretrained":
        raise SurgeonError(
            f"recipe {name!r} re-initializes the weights (init: {recipe.init})",
            "fine-tuning starts from the teacher's weights: set init: pretrained",
        )
    if init is not None and recipe.prune is not None:
        raise SurgeonError(
            f"recipe {name!r} prunes first (prune:), and --init gives a pruned start as well",
            "give one: drop --init, or use a recipe without prune: (e.g. sparsedm, asp)",
        )
    if init is not None and model is not None:
        raise SurgeonError("give MODEL or --init PRUNED, not both", "--init PRUNED is the student's starting point")
    with ExitStack() as hold:
        acc = open_run(out, recipe, force, resume, inputs={"model": [model, init], "teacher": [teacher]}, hold=hold)
        teacher_module = load_teacher(
            teacher, architecture=model if not isinstance(model, nn.Module) else None, trust_code=trust_code
        )
        if init is not None:  # a one-shot pruned model: its mask and updated weights
            student = load_source(init, trust_code)
            check_same_targets(student.model, teacher_module)
        elif model is None:  # the paper's setting: the student starts as the teacher
            student = Source(copy_model(teacher_module).train().requires_grad_(True))
            if not isinstance(teacher, nn.Module):
                student.vae = loading.find_autoencoder(str(teacher))
                student.pipeline = str(Path(teacher).resolve()) if student.vae is not None else None
        else:
            student = load_source(model, trust_code)
            check_same_targets(student.model, teacher_module)
        masks = pruned_masks(student.model, recipe, init) if init is not None else None
        if sites(student.model):  # a masked student starts from its effective weights
            fold(student.model)
        teacher_module = freeze(teacher_module)
        identity = {"source": _describe(teacher), "sha256": content_digest(teacher_module)}
        task = make_run_task(student, data, recipe, limit)
        recipe = with_task_defaults(recipe, task)
        objective = make_objective(task, recipe, teacher_module)
        if recipe.prune is not None:
            masks = prune_first(student.model, task, recipe)
        prepare(student.model, recipe, init="pretrained", masks=masks)
        return execute(
            student,
            task,
            recipe,
            out,
            acc,
            objective,
            resume=resume,
            progress=progress,
            samples=samples,
            stop_after=stop_after,
            teacher=identity,
        )


def pruned_masks(model: nn.Module, recipe: Recipe, ref) -> dict[str, torch.Tensor]:
    """The fixed masks of a one-shot pruned start, checked against the recipe's N:M pattern and targets."""
    from surgeon.sparsity.patterns import nm_groups, parse_nm

    n, m = parse_nm(recipe.nm)
    p = make_plan(
        model,
        nm=recipe.nm,
        include=recipe.include or None,
        exclude=recipe.exclude or None,
        dense_first=recipe.dense_first,
        dense_last=recipe.dense_last,
    )
    have = sites(model)
    for fqn in p.layers:
        site = have.get(fqn)
        if site is None or site.is_nm or not bool((nm_groups(site.mask, m).sum(1) <= n).all()):
            what = "has no mask" if site is None else "is not " + recipe.nm
            raise SurgeonError(
                f"--init {_describe(ref)}: {fqn} {what}, but the recipe fine-tunes {recipe.nm}",
                f"prune it with `surgeon prune --nm {recipe.nm}`; fine-tune an unstructured prune with "
                "`surgeon sparsify --recipe static --init pretrained`",
            )
    return {fqn: have[fqn].mask.detach().clone() for fqn in p.layers}


def prune_first(model: nn.Module, task: Task, recipe: Recipe) -> dict[str, torch.Tensor]:
    """A recipe's ``prune:`` step on the student: one-shot N:M from the run's data; returns its fixed masks."""
    from surgeon.algorithms.calibration import from_task
    from surgeon.algorithms.oneshot import prune_model
    from surgeon.masking.surgery import fold
    from surgeon.training.prune import make_pruner

    c = recipe.prune
    p = make_plan(
        model,
        nm=recipe.nm,
        include=recipe.include or None,
        exclude=recipe.exclude or None,
        dense_first=recipe.dense_first,
        dense_last=recipe.dense_last,
    )
    calibration = None
    if c.method != "magnitude":
        calibration = from_task(task, c.calib, c.timesteps, recipe.training.seed, c.batch_size)
    prune_model(model, p, make_pruner(c.method, c.block_size, c.damp), calibration, c.sequential, progress=False)
    masks = {fqn: site.mask.detach().clone() for fqn, site in sites(model).items()}
    fold(model)  # the weights stay pruned (0 where masked); prepare injects the recipe's own parametrization
    return masks


def _describe(ref: str | os.PathLike | nn.Module) -> str:
    """How a summary and a checkpoint name a model: a resolved path, a reference as given, or a class name."""
    if isinstance(ref, nn.Module):
        return f"<{type(ref).__name__} module>"
    return str(Path(ref).resolve()) if Path(ref).exists() else str(ref)
