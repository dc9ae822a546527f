"""``surgeon eval`` and ``surgeon.evaluate``: sample quality (FID, KID, precision/recall) and cost (parameters, FLOPs) of models.

For each model: generate ``n`` samples with the model's own sampler (DDIM for images; ChiroDiff strokes are
rendered to images first), extract features with the chosen extractor, and compare them with the held-out split
of the data (reference features cached per data, resolution and extractor). Cost comes from
:func:`surgeon.masking.measure.measure` on one real example; the held-out denoising loss uses fixed noise, so it compares
across models. Several models give one table; with an output folder, their sample grids side by side and, for
several models, FID against sparsity and against inference FLOPs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError, UsageError
from surgeon.evaluation.extractors import ExtractorInfo, load_extractor, resolve_extractor
from surgeon.evaluation.fidelity import MIN_EXAMPLES, Scores, extract_features, parse_metrics, reference_features, score
from surgeon.io.lock import exclusive
from surgeon.seeding import generator

GRID_SAMPLES = 36


@dataclass
class ModelEval(Scores):
    """One model's scores (FID, KID, sample counts: :class:`surgeon.evaluation.fidelity.Scores`) and cost."""

    name: str = ""
    algorithm: str | None = None  # from the recipe a surgeon folder records; None for a plain model
    sparsity: float = 0.0
    params_total: int = 0
    params_kept: int = 0
    flops_forward: float | None = None  # one denoiser evaluation of one example, sparse (Evci et al.)
    flops_forward_dense: float | None = None
    flops_per_sample: float | None = None  # forward × sampling steps
    flops_train: float | None = None  # the whole recorded training run (per-example step FLOPs × batch × steps)
    heldout_loss: float | None = None
    clip_sample: bool | None = None  # whether sampling clipped x₀ to [-1, 1] (the recorded setting or the override)
    eta: float | None = None  # DDIM's η used in sampling (the recorded setting or the override)


@dataclass
class Evaluation:
    data: str
    extractor: ExtractorInfo
    n: int
    sample_steps: int
    metrics: tuple[str, ...]
    rows: list[ModelEval]
    out_dir: str | None = None
    plots: dict[str, str] = field(default_factory=dict)
    group: dict | None = None  # with group=True: mean ± std of every metric over the models (seeds of one setup)

    @property
    def label(self) -> str:
        return self.extractor.label

    def to_dict(self) -> dict:
        return {
            "data": self.data,
            "extractor": self.extractor.to_dict(),
            "metric_label": self.label,
            "n": self.n,
            "sample_steps": self.sample_steps,
            "metrics": list(self.metrics),
            "models": [asdict(r) for r in self.rows],
            "out_dir": self.out_dir,
            "plots": self.plots,
            "group": self.group,
        }


def check_inputs(
    n: int,
    metrics,
    sample_steps: int,
    extractor: str | None,
    batch_size: int = 64,
    seed: int = 0,
    eta: float | None = None,
) -> tuple[tuple[str, ...], ExtractorInfo]:
    """Validate everything cheap before any model is loaded, as a training run checks its own; returns (metrics,
    extractor)."""
    from surgeon.recipe import MAX_SEED

    metrics = parse_metrics(metrics)
    need = max(MIN_EXAMPLES[m] for m in metrics)
    if not isinstance(n, int) or n < need:
        raise UsageError(
            f"--n {n}: {'/'.join(m.upper() for m in metrics)} need(s) at least {need} samples",
            f"use --n 2048 (the default) or any count >= {need}; more samples give steadier numbers",
        )
    if not isinstance(sample_steps, int) or sample_steps < 1:
        raise UsageError(f"--sample-steps {sample_steps} must be at least 1", "50 DDIM steps is the default")
    if eta is not None and not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise UsageError(f"--eta {eta} must be in [0, 1]", "0 is deterministic DDIM, 1 samples like DDPM")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_SEED:
        raise UsageError(f"--batch-size {batch_size} must be at least 1", "64 samples per batch is the default")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise UsageError(
            f"--seed {seed} is outside [0, 2**63 - 1]", "use a non-negative seed that fits in 63 bits, e.g. --seed 0"
        )
    return metrics, resolve_extractor(extractor)


def open_model(
    ref: str | os.PathLike | nn.Module, trust_code: bool = False
) -> tuple[nn.Module, dict, nn.Module | None, str]:
    """(model, recorded recipe dict or {}, frozen autoencoder or None, display name) for a model reference.

    A run folder (with ``model/`` inside) stands for its model; a surgeon folder's metadata gives the recipe.
    """
    from surgeon.formats.loading import load_model

    if isinstance(ref, nn.Module):
        return ref, {}, None, type(ref).__name__
    path = Path(ref)
    name = str(ref)
    if path.is_dir() and (path / "model").is_dir() and not (path / "config.json").exists():
        path = path / "model"
    model = load_model(str(path) if path.exists() else str(ref), trust_code=trust_code)
    recipe: dict = {}
    vae: nn.Module | None = None
    if (path.is_dir() and (path / "model.safetensors").is_file()) or (
        path.is_file() and path.suffix == ".safetensors" and _written_by_surgeon(path)
    ):
        from surgeon.formats.loading import find_autoencoder
        from surgeon.io.container import read_metadata

        meta = read_metadata(path)
        recipe = meta.get("recipe") or {}
        pipeline = (meta.get("extra") or {}).get("pipeline")
        if pipeline:
            vae = find_autoencoder(pipeline)
    elif path.is_dir():
        from surgeon.formats.loading import find_autoencoder

        vae = find_autoencoder(str(path))
    return model, recipe, vae, name


GROUP_METRICS = ("fid", "kid_mean", "precision", "recall", "heldout_loss")


def group_summary(rows: Sequence[ModelEval]) -> dict:
    """Mean ± sample std of every metric over the models of one configuration (e.g. its seeds)."""
    from surgeon.evaluation.stats import mean_std

    out: dict = {"models": len(rows)}
    for key in GROUP_METRICS:
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        if values:
            mean, std = mean_std(values)
            out[key] = {"mean": mean, "std": std, "values": values}
    return out


def check_one_configuration(recipes: Sequence[dict], names: Sequence[str]) -> None:
    """The models of a group must differ in their seed only (their recorded recipes otherwise equal)."""

    def flat(d: dict, prefix: str = "") -> dict:
        items: dict = {}
        for k, v in d.items():
            items.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return items

    first = {k: v for k, v in flat(recipes[0]).items() if k != "training.seed"}
    for recipe, name in zip(recipes[1:], names[1:]):
        other = {k: v for k, v in flat(recipe).items() if k != "training.seed"}
        differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differ:
            raise SurgeonError(
                f"--group: {name} differs from {names[0]} in {differ[0]} ({other.get(differ[0])!r} vs "
                f"{first.get(differ[0])!r}), not only in its seed",
                "group only runs of one configuration (the seeds of one recipe); compare configurations without "
                "--group",
            )


def _written_by_surgeon(file: Path) -> bool:
    from safetensors import safe_open

    from surgeon.io.container import MARKER

    try:
        with safe_open(str(file), "pt") as f:
            return (f.metadata() or {}).get("format") == MARKER
    except Exception:  # noqa: BLE001 - not a readable safetensors file: load_model reports it
        return False


def _training_flops(measured, recipe: dict) -> float | None:
    """The recorded run's training FLOPs, from the recipe a surgeon folder stores (None for a plain model)."""
    if not recipe:
        return None
    from surgeon.recipe import Recipe

    return measured.run_flops(Recipe.from_dict(recipe))


@torch.no_grad()
def generate_images(task, model: nn.Module, n: int, steps: int, seed: int, batch_size: int, progress=None):
    """``n`` samples as uint8 images ``[n, H, W, C]``, in batches, from one seeded generator."""
    gen = generator(seed)
    chunks = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        samples = task.sample(model, b, generator=gen, steps=steps)
        try:
            images = task.to_images(samples)
        except NotImplementedError as e:
            raise SurgeonError(
                f"samples of {type(model).__name__} cannot be rendered to images",
                "FID/KID need a task whose to_images turns samples into pictures",
            ) from e
        if not (
            torch.is_tensor(images)
            and images.dtype == torch.uint8
            and images.dim() == 4
            and images.shape[-1] in (1, 3)
            and len(images) == b
        ):
            raise SurgeonError(
                f"samples of {type(model).__name__} did not render to {b} uint8 images [N, H, W, C]",
                "FID/KID need a task whose to_images returns uint8 [N, H, W, 1 or 3]",
            )
        chunks.append(images)
        if progress is not None:
            progress.advance(b)
    return torch.cat(chunks)


def evaluate(
    models: Sequence[str | os.PathLike | nn.Module] | str | nn.Module,
    data: str = "kanjivg",
    n: int = 2048,
    metrics="fid,kid,pr",
    sample_steps: int = 50,
    extractor: str | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    console=None,
    limit: int | None = None,
    trust_code: bool = False,
    clip_sample: bool | None = None,
    group: bool = False,
    eta: float | None = None,
) -> Evaluation:
    """FID/KID, held-out loss, parameters and FLOPs of each model; one table (:class:`Evaluation`).

    ``clip_sample``: override the model's recorded sampler setting (clip x₀ to [-1, 1] at every step); None uses
    the recorded one, or the task's default for a model that records none (pixel-space images clip; latent and
    sequence models do not). ``eta``: override the recorded DDIM η (``diffusion.eta``; 0 for a model that records
    none).

    ``group``: the models are runs of one configuration (seeds of one recipe): also report mean ± std of every
    metric over them (:attr:`Evaluation.group`).

    ``trust_code``: let saved folders import the file or module their config names (see :func:`surgeon.load_model`).

    ``extractor``: ``inception-v3-compat`` (needs its weights on disk) or ``efficientnet-lite0`` (offline; its FID
    is not comparable with Inception FID); None picks Inception when available. ``out``: a folder for sample grids
    and plots (must be empty or absent unless ``force``). ``limit``: use only the first N examples of each split
    (quick checks; the reference then holds at most N held-out examples).
    """
    from surgeon.evaluation.heldout import heldout_loss
    from surgeon.masking.measure import measure_task
    from surgeon.progress import WorkProgress
    from surgeon.recipe import Recipe
    from surgeon.tasks import apply_diffusion_settings, make_task
    from surgeon.tasks.base import EpsilonLoss

    if isinstance(models, (str, os.PathLike, nn.Module)):
        models = [models]
    if not models:
        raise UsageError("no model to evaluate", "pass one or more MODEL folders")
    metrics, info = check_inputs(n, metrics, sample_steps, extractor, batch_size, seed, eta)
    if group and len(models) < 2:
        raise UsageError("--group needs at least 2 models", "pass the run folders of every seed of one configuration")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        from surgeon.io.atomic import check_apart, replaceable

        check_apart(out_dir, "model", *models)
        if not (replaceable(out_dir) or force):
            raise SurgeonError(f"output folder {out_dir} exists", "pass --force to overwrite it")
    with exclusive(out_dir) if out_dir is not None else nullcontext():  # one writer per output folder
        if console is not None:
            console.print(
                f"[bold]surgeon eval[/]: {len(models)} model(s) on {data}, n = {n}, {sample_steps} sampling steps; "
                f"{info.label}"
            )
        feats_model = load_extractor(info)
        references: dict[tuple, torch.Tensor] = {}
        rows, grids = [], []
        if group:  # every model's recipe checked before any is sampled
            check_one_configuration([open_model(ref, trust_code)[1] for ref in models], [str(m) for m in models])
        for ref in models:
            model, recipe, vae, name = open_model(ref, trust_code)
            model.eval()
            task = make_task(model, data, vae=vae, limit=limit)
            channels = getattr(task, "image_channels", None)
            if channels is not None and channels not in (1, 3):
                raise SurgeonError(
                    f"samples of {name} have {channels} channels and cannot be rendered to images",
                    "FID/KID score 1- or 3-channel images; evaluate a latent model through its pipeline "
                    "folder (with its vae/)",
                )
            if recipe.get("diffusion"):
                apply_diffusion_settings(task, Recipe.from_dict(recipe).diffusion)
            timesteps = task.scheduler.config.num_train_timesteps
            if sample_steps > timesteps:
                raise UsageError(
                    f"--sample-steps {sample_steps} is beyond the {timesteps} timesteps of {name}'s noise schedule",
                    f"use --sample-steps {timesteps} or less (50 is the default)",
                )
            task.set_clip_sample(clip_sample)
            if eta is not None:
                task.eta = float(eta)
            task.dataset("train")  # sequence tasks draw sample lengths from it; FLOPs use one real training example
            resolution = int(getattr(task, "image_size", 0))
            key = (resolution, type(task).__name__)
            if key not in references:
                with WorkProgress("reference features", 1, enabled=progress) as bar:
                    references[key] = reference_features(
                        task, data, info.name, feats_model, resolution, metrics, limit=limit
                    )
                    bar.advance()
            with WorkProgress(f"sampling {Path(str(name)).name}", n, enabled=progress) as bar:
                images = generate_images(task, model, n, sample_steps, seed, batch_size, bar)
            with WorkProgress("features", n, enabled=progress) as bar:
                feats = extract_features(feats_model, images, progress=bar.set)
            s = score(feats, references[key], metrics)
            measured = measure_task(model, task)
            loss = heldout_loss(model, task, EpsilonLoss(task), min(batch_size, 32), 4, seed)
            steps_fwd = measured.flops_sparse
            rows.append(
                ModelEval(
                    **asdict(s),
                    name=name,
                    algorithm=recipe.get("algorithm"),
                    sparsity=measured.sparsity,
                    params_total=measured.params_total,
                    params_kept=measured.params_kept,
                    flops_forward=steps_fwd,
                    flops_forward_dense=measured.flops_dense,
                    flops_per_sample=None if steps_fwd is None else steps_fwd * sample_steps,
                    flops_train=_training_flops(measured, recipe),
                    heldout_loss=loss,
                    clip_sample=task.clip_sample,
                    eta=task.eta,
                )
            )
            grids.append((Path(str(name)).name if not isinstance(ref, nn.Module) else name, images[:GRID_SAMPLES]))
        result = Evaluation(data, info, n, sample_steps, metrics, rows, str(out_dir) if out_dir else None)
        if group:
            result.group = group_summary(rows)
        if out_dir is not None:
            write_outputs(result, grids, out_dir)
        return result


def write_outputs(result: Evaluation, grids, out_dir: Path) -> None:
    """samples.png (grids side by side), one grid per model, FID plots for several models, results.json.

    The folder is written whole or not at all (:func:`surgeon.io.atomic.atomic_folder`): a forced run replaces
    every file of the previous one, and a run killed while writing leaves the previous folder or nothing."""
    from surgeon.io.atomic import atomic_folder

    with atomic_folder(out_dir, force=True) as tmp:  # the caller refused an existing folder without --force
        _write_outputs(result, grids, tmp)
        result.plots = {name: str(out_dir / Path(path).name) for name, path in result.plots.items()}
        (tmp / "results.json").write_text(json.dumps(result.to_dict(), indent=2))


def _write_outputs(result: Evaluation, grids, folder: Path) -> None:
    from surgeon.data.render import render_grid
    from surgeon.evaluation.plots import grids_side_by_side, metric_vs

    pictures = []
    for row, (label, images) in zip(result.rows, grids):
        k = len(images)
        pictures.append(
            (
                f"{label}\nFID {row.fid:.2f}" if row.fid is not None else label,
                render_grid(images, nrow=max(1, int(math.sqrt(k)))),
            )
        )
    result.plots["samples"] = str(
        grids_side_by_side([(lbl, _array(g)) for lbl, g in pictures], folder / "samples.png", title=result.label)
    )
    fids = [r for r in result.rows if r.fid is not None]
    if len(fids) > 1:
        dense = [r.fid for r in fids if r.sparsity == 0.0]
        points = [
            {"method": r.algorithm or "model", "sparsity": r.sparsity, "flops": r.flops_forward, "fid": r.fid}
            for r in fids
        ]
        ref = dense[0] if dense else None
        result.plots["fid_vs_sparsity"] = str(
            metric_vs(points, "sparsity", "fid", folder / "fid_vs_sparsity.png", "sparsity S", result.label, dense=ref)
        )
        if all(p["flops"] is not None for p in points):
            result.plots["fid_vs_flops"] = str(
                metric_vs(
                    points,
                    "flops",
                    "fid",
                    folder / "fid_vs_flops.png",
                    "inference FLOPs per denoiser call",
                    result.label,
                    dense=ref,
                )
            )


def _array(grid):
    import numpy as np

    return np.asarray(grid)
