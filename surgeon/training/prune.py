"""The run behind ``surgeon prune`` (and ``surgeon.prune``): calibrated one-shot pruning of a trained model.

    source      = load_source(model)                        # the denoiser (+ frozen autoencoder of a latent pipeline)
    calibration = calibration_for(source, data, ...)         # N noisy examples through the model's own noise schedule
    plan        = surgeon.plan(model, sparsity | nm, ...)    # what each target keeps
    report      = prune_model(model, plan, pruner, calibration, sequential)   # statistics, OBS / Wanda, masks
    save(model, out, extra_metadata={"prune": {...}})        # a surgeon folder: fixed masks, method and calibration

The saved model keeps the recipe its source recorded (so evaluation uses the same noise schedule) and adds
``extra.prune``: method, pattern, calibration (examples, timestep scheme, seed, data), sequential, block size,
damping, blocks, passes and seconds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from surgeon.algorithms import PRUNERS
from surgeon.algorithms.calibration import Calibration, check_calib, from_task, parse_timesteps
from surgeon.algorithms.oneshot import PruneReport, prune_model
from surgeon.algorithms.pruners import SparseGPT
from surgeon.errors import SurgeonError, check_arg
from surgeon.formats import loading
from surgeon.io.atomic import check_output
from surgeon.masking.plan import Plan
from surgeon.masking.plan import plan as make_plan
from surgeon.masking.surgery import fold, sites
from surgeon.recipe import Diffusion
from surgeon.sparsity.patterns import parse_nm
from surgeon.tasks import Task, apply_diffusion_settings, make_task

METHODS = tuple(PRUNERS)


@dataclass
class PruneResult:
    model: nn.Module  # pruned in place, with fixed masks
    report: PruneReport
    metadata: dict  # what the saved model records under extra.prune
    out: Path | None = None


def check_options(method: str, sparsity, nm, damp: float, block_size: int, calib: int, timesteps: str) -> None:
    """Every option in range, before anything loads."""
    if method not in PRUNERS:
        raise SurgeonError(f"unknown pruning method {method!r}", f"choose one of: {', '.join(METHODS)}")
    if (sparsity is None) == (nm is None):
        raise SurgeonError("give exactly one of --s (unstructured) or --nm (N:M)", "e.g. --nm 2:4 or --s 0.5")
    check_arg(damp, (int, float), "damp", "a number")
    if not (math.isfinite(damp) and damp > 0):
        raise SurgeonError(f"--damp must be > 0, got {damp}", "SparseGPT's default is 0.01 (1% of the mean diagonal)")
    check_arg(block_size, int, "block_size", "an integer")
    if block_size < 1:
        raise SurgeonError(f"--block-size must be ≥ 1, got {block_size}", "SparseGPT's default is 128")
    if nm is not None and block_size % parse_nm(nm)[1]:
        raise SurgeonError(
            f"--block-size {block_size} is not a multiple of M={parse_nm(nm)[1]}", "use e.g. --block-size 128"
        )
    check_calib(calib)
    parse_timesteps(timesteps)


def recorded_recipe(ref) -> dict:
    """The recipe a surgeon folder (or run folder) records, else {}."""
    if isinstance(ref, nn.Module):
        return {}
    from surgeon.io.container import read_metadata

    path = Path(ref)
    if path.is_dir() and (path / "model").is_dir() and not (path / "config.json").exists():
        path = path / "model"
    if not ((path.is_dir() and (path / "model.safetensors").is_file()) or path.suffix == ".safetensors"):
        return {}
    try:
        return read_metadata(path).get("recipe") or {}
    except SurgeonError:
        return {}


def calibration_for(
    model: nn.Module, vae: nn.Module | None, data, calib: int, timesteps: str, seed: int, batch_size: int, recipe: dict
) -> Calibration | None:
    """Calibration inputs from a data reference, a Task or ready batches (a Calibration)."""
    if data is None or isinstance(data, Calibration):
        return data
    task = data if isinstance(data, Task) else make_task(model, str(data), vae=vae)
    if not isinstance(data, Task) and recipe.get("diffusion"):
        apply_diffusion_settings(task, Diffusion(**recipe["diffusion"]))
    calibration = from_task(task, calib, timesteps, seed, batch_size)
    calibration.info["data"] = data if isinstance(data, str) else type(data).__name__
    return calibration


def make_pruner(method: str, block_size: int = 128, damp: float = 0.01):
    return SparseGPT(block_size, damp) if method == "sparsegpt" else PRUNERS[method]()


def describe(
    method: str,
    plan: Plan,
    calibration: Calibration | None,
    sequential: bool,
    block_size: int,
    damp: float,
    report: PruneReport,
) -> dict:
    """What a pruned model records under ``extra.prune``."""
    pattern = (
        f"{plan.nm[0]}:{plan.nm[1]}" if plan.nm else {"sparsity": plan.sparsity, "distribution": plan.distribution}
    )
    return {
        "method": method,
        "pattern": pattern,
        "calibration": None if calibration is None else dict(calibration.info),
        "sequential": sequential,
        **({"block_size": block_size, "damp": damp} if method == "sparsegpt" else {}),
        **{k: v for k, v in asdict(report).items() if k in ("blocks", "passes", "seconds")},
    }


def check_masks(model: nn.Module, plan: Plan) -> None:
    """A masked model is pruned again only from the same pattern (its effective weights); another is refused."""
    existing = sites(model)
    if not existing:
        return
    want = f"{plan.nm[0]}:{plan.nm[1]}" if plan.nm else f"unstructured S={plan.sparsity}"
    for fqn, site in existing.items():
        lp = plan.layers.get(fqn)
        if site.is_nm:
            have = f"{site.parametrization.n}:{site.parametrization.m} (straight-through)"
        else:
            density = float(site.mask.float().mean())
            have = f"density {density:.3f}"
            if lp is not None and lp.nm is None and abs(lp.kept - int(site.mask.sum())) <= 1:
                continue
            if lp is not None and lp.nm is not None and abs(density - lp.nm[0] / lp.nm[1]) < 1e-9:
                from surgeon.sparsity.patterns import nm_groups

                if bool((nm_groups(site.mask, lp.nm[1]).sum(1) <= lp.nm[0]).all()):
                    continue
        raise SurgeonError(
            f"the model is already masked by another pattern ({fqn}: {have}; asked for {want})",
            "prune the dense model (surgeon export --format dense), or ask for the pattern it has",
        )
    fold(model)


def prune(
    model: str | os.PathLike | nn.Module,
    data: str | Task | Calibration | None = None,
    out: str | os.PathLike | None = None,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    nm: str | None = None,
    distribution: str = "uniform",
    calib: int = 128,
    timesteps: str = "uniform",
    sequential: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    batch_size: int = 16,
    seed: int = 0,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    force: bool = False,
    progress: bool = True,
    trust_code: bool = False,
) -> PruneResult:
    """One-shot pruning of a trained model to ``sparsity`` (spread by ``distribution``) or an ``nm`` pattern.

    ``method``: magnitude, wanda or sparsegpt. ``data``: a data reference ("kanjivg", a folder), a Task you built,
    or a :class:`~surgeon.algorithms.calibration.Calibration` of your own batches; magnitude needs none.
    ``calib`` examples are noised at timesteps drawn by ``timesteps`` (uniform, K-stratified, weighted). The
    model is pruned in place; with ``out`` it is saved there (refused if it exists, unless ``force``)::

        surgeon.prune("runs/dense/model", "kanjivg", "runs/sparsegpt-2of4", nm="2:4")
    """
    check_options(method, sparsity, nm, damp, block_size, calib, timesteps)
    if PRUNERS[method].needs != "none" and data is None:
        raise SurgeonError(f"--method {method} needs calibration data", "pass --data (e.g. --data kanjivg)")
    if out is not None:
        check_output(out, force)
    if isinstance(model, nn.Module):
        module, vae, pipeline = model, None, None
    else:
        vae = loading.find_autoencoder(str(model))
        module = loading.load_model(str(model), trust_code=trust_code)
        pipeline = str(Path(model).resolve()) if vae is not None else None
    recipe = recorded_recipe(model)
    targets = {"include": include or None, "exclude": exclude or None}
    if nm is not None:
        plan = make_plan(module, nm=nm, **targets)
    else:
        plan = make_plan(module, sparsity=sparsity, distribution=distribution, **targets)
    check_masks(module, plan)
    calibration = calibration_for(module, vae, data, calib, timesteps, seed, batch_size, recipe)
    report = prune_model(module, plan, make_pruner(method, block_size, damp), calibration, sequential, progress)
    metadata = describe(method, plan, calibration, sequential, block_size, damp, report)
    result = PruneResult(module, report, metadata)
    if out is not None:
        from surgeon.formats.packed import save

        extra = {"prune": metadata, **({"pipeline": pipeline} if pipeline else {})}
        result.out = save(module, out, recipe=recipe or None, force=force, extra_metadata=extra)
    return result
