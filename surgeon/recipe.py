"""Recipes: declarative YAML training settings, validated against a typed schema (unknown keys rejected by name).

A recipe is found by shipped name (``recipes/<name>.yaml``, packaged as ``surgeon.recipes``) or by path. CLI flags
override single fields after loading, through :func:`Recipe.override`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from surgeon.errors import SurgeonError
from surgeon.sparsity.patterns import parse_nm

ALGORITHMS = ("dense", "static", "magran", "rigl", "nm_ste", "nm_fixed")
UNSTRUCTURED = ("static", "magran", "rigl")  # a global sparsity spread over layers by a distribution
DYNAMIC = ("magran", "rigl")  # prune-and-regrow (the dst: section)
NM = ("nm_ste", "nm_fixed")  # N:M along the reduction dimension: recomputed every forward (STE) or fixed once (ASP)
TEACHERS = ("dense", "previous")


@dataclass
class DST:
    """Prune-and-regrow schedule of Algorithm 2 (RigL-DM / MagRan-DM)."""

    delta_t: int = 100  # ΔT_e: steps between mask updates (paper: 1100 latent diffusion, 800 ChiroDiff)
    p: float = 0.05  # fraction of active weights dropped and regrown per update (paper main runs: 0.5)
    p_decay: str = "cosine"  # "cosine" | "constant"
    stop_fraction: float = 0.75  # no mask updates after this fraction of training
    skip_optimizer_step: bool = False  # the RigL reference skips the optimizer step on update steps


@dataclass
class Optimizer:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class Diffusion:
    """DDPM noise schedule; null fields take the task's default (images: 0.0015–0.0195, ChiroDiff: 1e-4–2e-2)."""

    timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str = "linear"
    sample_steps: int = 50  # DDIM steps for sample grids
    # clip the predicted x₀ to [-1, 1] at every sampling step; None: the task's default, resolved when a run starts
    # (pixel-space images: true; latent and sequence models: false)
    clip_sample: bool | None = None
    # DDIM's η: 0 is deterministic DDIM; 1 adds, at every step, the noise of DDPM's posterior, which corrects an
    # imperfect denoiser's errors instead of committing to them (Song et al. 2021, eq. 16)
    eta: float = 0.0


@dataclass
class Training:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    ema_decay: float | None = None  # e.g. 0.999; EMA copies follow the masks
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # 0 keeps every checkpoint
    log_every: int = 10
    eval_batches: int = 4  # held-out denoising loss at the end (fixed noise)
    num_samples: int = 16  # images in the PNG grid (0: no grid)
    seed: int = 0


@dataclass
class Distill:
    """SparseDM loss (eq. 11): λ1·‖F_s − F_t‖² + λ2·‖ε − F_s‖², the teacher frozen, on the student's x_t and t."""

    lambda_1: float = 1.0
    lambda_2: float = 1.0
    teacher: str = "dense"  # "dense": the model fine-tuning started from | "previous": the previous stage's model


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
_TIMESTEP_SCHEME = re.compile(r"^(uniform|weighted|[1-9][0-9]*-stratified)$")


@dataclass
class Prune:
    """One-shot pruning before fine-tuning (``surgeon prune``'s options): the fine-tune starts from its mask and
    updated weights instead of magnitude."""

    method: str = "sparsegpt"  # magnitude | wanda | sparsegpt
    calib: int = 128  # calibration examples from the run's data, one timestep each
    timesteps: str = "uniform"  # uniform | K-stratified | weighted
    sequential: bool = True  # block by block from the pruned model (False: every layer from the dense one)
    block_size: int = 128  # SparseGPT's lazy update block
    damp: float = 0.01  # SparseGPT's damping, a fraction of mean diag(H)
    batch_size: int = 16


@dataclass
class Stage:
    """One stage of progressive N:M fine-tuning: ``steps`` optimizer steps under pattern ``nm``."""

    nm: str
    steps: int


@dataclass
class Recipe:
    """A training recipe. Fields that only some algorithms read are unset (None) by default; setting one that the
    chosen algorithm would not read is an error, never silently ignored. Unset fields the algorithm does read take
    their defaults when the recipe is built, so a resolved recipe shows every value that was used."""

    algorithm: str = "static"
    name: str | None = None
    description: str = ""
    # unstructured (static, magran, rigl)
    sparsity: float | None = None  # default 0.5
    distribution: str | None = None  # "erk" (default) | "er" | "uniform"
    power_scale: float | None = None  # ERK exponent scale, default 1.0
    # N:M (nm_ste, nm_fixed)
    nm: str | None = None  # "2:4"; with stages, the last stage's pattern
    lambda_w: float | None = None  # nm_ste: SR-STE decay λ_W (default 0: plain STE)
    stages: list[Stage] | None = None  # nm_ste: progressive patterns, tightening; their steps add up to training.steps
    # every masking algorithm
    dense_first: bool = False
    dense_last: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    init: str = "scratch"  # "scratch": re-initialize weights (the paper's setting) | "pretrained": keep them
    dst: DST | None = None  # magran, rigl
    optimizer: Optimizer = field(default_factory=Optimizer)
    diffusion: Diffusion = field(default_factory=Diffusion)
    training: Training = field(default_factory=Training)
    distill: Distill | None = None  # needs a teacher: `surgeon finetune`
    prune: Prune | None = None  # N:M: calibrated one-shot pruning first (sparsegpt-2of4, sparsegpt+sparsedm)

    def __post_init__(self):
        _fill_defaults(self)
        _check(self)

    @property
    def stage_steps(self) -> list[tuple[tuple[int, int], int]]:
        """``[((n, m), steps), ...]``: the N:M stages in order (one stage when the recipe has no stages)."""
        if self.stages:
            return [(parse_nm(s.nm), s.steps) for s in self.stages]
        return [(parse_nm(self.nm), self.training.steps)] if self.nm else []

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def override(self, **changes: Any) -> Recipe:
        """A copy with fields replaced; keys are ``field`` or ``section.field`` (None values are ignored)."""
        d = self.to_dict()
        for key, value in changes.items():
            if value is None:
                continue
            *path, leaf = key.split(".")
            node = d
            for part in path:
                if node.get(part) is None:  # an unset optional section, e.g. distill
                    node[part] = {}
                node = node[part]
            node[leaf] = value
        return Recipe.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "recipe") -> Recipe:
        return _build(cls, d, source)


def _plain(x):
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _fail(source: str, what: str, hint: str = "see the shipped recipes in surgeon/recipes/ for the schema"):
    raise SurgeonError(f"{source}: {what}", hint)


def _coerce(value: Any, tp: Any, where: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(source, f"'{where}' must be a mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{where}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(source, f"'{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            _fail(source, f"'{where}' must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(source, f"'{where}' must be a number, got {value!r}")
        if not math.isfinite(value):  # .nan and .inf are valid YAML floats; no setting means either
            _fail(
                source, f"'{where}' must be a finite number, got {value!r}", "give a plain number such as 0.5 or 1e-4"
            )
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, f"'{where}' must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(source, f"'{where}' must be a list, got {value!r}")
        if origin is tuple and len(value) != len(args):
            _fail(source, f"'{where}' must have {len(args)} entries, got {value!r}")
        items = [_coerce(v, args[i] if origin is tuple else args[0], where, source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def _build(cls, d: Mapping[str, Any], source: str, prefix: str = ""):
    if not isinstance(d, Mapping):
        _fail(source, "a recipe must be a YAML mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in known]
    if unknown:
        _fail(source, f"unknown key '{prefix}{unknown[0]}'", f"known keys here: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except SurgeonError as e:
        raise SurgeonError(f"{source}: {e.message}", e.hint) from None


# the noise schedules diffusers' DDPMScheduler implements
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; surgeon derives per-step seeds from it with signed arithmetic

# which algorithms read each optional field; setting it for another algorithm is an error
_READ_BY = {
    "sparsity": UNSTRUCTURED,
    "distribution": UNSTRUCTURED,
    "power_scale": UNSTRUCTURED,
    "dst": DYNAMIC,
    "nm": NM,
    "lambda_w": ("nm_ste",),
    "stages": ("nm_ste",),
    "dense_first": UNSTRUCTURED + NM,
    "dense_last": UNSTRUCTURED + NM,
    "include": UNSTRUCTURED + NM,
    "exclude": UNSTRUCTURED + NM,
    "prune": NM,
}
_DEFAULTS = {"sparsity": 0.5, "distribution": "erk", "power_scale": 1.0, "lambda_w": 0.0}


def _fill_defaults(r: Recipe) -> None:
    if r.algorithm not in ALGORITHMS:
        return  # _check names the problem
    for name, value in _DEFAULTS.items():
        if getattr(r, name) is None and r.algorithm in _READ_BY[name]:
            setattr(r, name, value)
    if r.dst is None and r.algorithm in DYNAMIC:
        r.dst = DST()
    if r.stages and r.nm is None:
        r.nm = r.stages[-1].nm


def _is_set(value: Any) -> bool:
    return value not in (None, False) and value != []


def _check(r: Recipe) -> None:
    """Every value in range, so a bad recipe or flag fails here, before any model or data is loaded."""

    def bad(msg: str, hint: str = "fix the recipe or the flag"):
        raise SurgeonError(msg, hint)

    if r.algorithm not in ALGORITHMS:
        bad(f"unknown algorithm {r.algorithm!r}", f"choose one of: {', '.join(ALGORITHMS)}")
    for name, readers in _READ_BY.items():
        if _is_set(getattr(r, name)) and r.algorithm not in readers:
            bad(
                f"algorithm {r.algorithm} does not use '{name}'",
                f"remove it from the recipe; it applies to: {', '.join(readers)}",
            )
    if r.algorithm in NM:
        if not r.nm:
            bad(f"algorithm {r.algorithm} needs an N:M pattern", "set nm: '2:4' or pass --nm 2:4")
        parse_nm(r.nm)
    if r.algorithm in UNSTRUCTURED:
        s = r.sparsity
        if math.isnan(s) or not 0.0 <= s < 1.0:
            bad(f"sparsity {s!r} is outside [0, 1)", "pass a fraction of weights to remove, e.g. --s 0.5")
        if r.distribution not in ("erk", "er", "uniform"):
            bad(f"unknown distribution {r.distribution!r}", "choose erk, er or uniform")
    if r.power_scale is not None and r.power_scale < 0:
        bad(f"power_scale {r.power_scale} must be ≥ 0", "1.0 is the paper's ERK; 0 makes the budget uniform")
    if r.lambda_w is not None and r.lambda_w < 0:
        bad(f"lambda_w {r.lambda_w} must be ≥ 0", "0 turns the SR-STE decay off; SparseDM uses about 2e-4")
    if r.stages is not None:
        _check_stages(r)
    if r.init not in ("scratch", "pretrained"):
        bad(f"unknown init {r.init!r}", "choose scratch or pretrained")
    if r.dst is not None:
        _check_dst(r.dst)
    if r.prune is not None:
        _check_prune(r)
    if r.distill is not None:
        d = r.distill
        if d.lambda_1 < 0 or d.lambda_2 < 0 or d.lambda_1 + d.lambda_2 == 0:
            bad(
                f"distill weights lambda_1={d.lambda_1}, lambda_2={d.lambda_2}: both ≥ 0, not both 0",
                "use e.g. lambda_1: 1.0, lambda_2: 1.0 (SparseDM)",
            )
        if d.teacher not in TEACHERS:
            bad(f"unknown teacher {d.teacher!r}", "choose dense (the model fine-tuning started from) or previous")
        if d.teacher == "previous" and not r.stages:
            bad("teacher: previous needs progressive stages", "add stages (--stages 7:8,3:4,2:4) or use teacher: dense")
    o = r.optimizer
    if o.lr <= 0:
        bad(f"learning rate must be > 0, got {o.lr}", "use e.g. --lr 1e-4")
    if o.weight_decay < 0:
        bad(f"weight_decay must be ≥ 0, got {o.weight_decay}", "use e.g. 1e-2 (the paper's AdamW setting) or 0")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        bad(f"AdamW betas {list(o.betas)} must both lie in [0, 1)", "use e.g. betas: [0.9, 0.999]")
    if o.eps <= 0:
        bad(f"optimizer eps must be > 0, got {o.eps}", "use e.g. 1e-8")
    d = r.diffusion
    if d.timesteps < 1:
        bad(f"diffusion.timesteps must be ≥ 1, got {d.timesteps}", "use e.g. 1000 (DDPM)")
    if not 1 <= d.sample_steps <= d.timesteps:
        bad(f"diffusion.sample_steps must be in [1, timesteps={d.timesteps}], got {d.sample_steps}", "use e.g. 50")
    if d.beta_schedule not in BETA_SCHEDULES:
        bad(f"unknown beta_schedule {d.beta_schedule!r}", f"choose one of: {', '.join(BETA_SCHEDULES)}")
    for name in ("beta_start", "beta_end"):
        beta = getattr(d, name)
        if beta is not None and not 0.0 < beta < 1.0:
            bad(f"diffusion.{name} must be in (0, 1), got {beta}", "use e.g. beta_start: 1.0e-4, beta_end: 2.0e-2")
    if not 0.0 <= d.eta <= 1.0:
        bad(f"diffusion.eta must be in [0, 1], got {d.eta}", "0 is deterministic DDIM, 1 samples like DDPM")
    if d.beta_start is not None and d.beta_end is not None and d.beta_start > d.beta_end:
        bad(f"diffusion.beta_start {d.beta_start} is above beta_end {d.beta_end}", "noise grows over time: start < end")
    t = r.training
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(t, name) > MAX_SEED:  # step counters and batch positions are 64-bit integers in torch
            bad(f"training.{name} {getattr(t, name)} is beyond 2**63 - 1", "use a count that fits in 63 bits")
    if t.steps < 0:
        bad(f"training.steps must be ≥ 0 (0: prune without training), got {t.steps}")
    for name in ("batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_batches"):
        if getattr(t, name) < 1:
            bad(f"training.{name} must be ≥ 1, got {getattr(t, name)}")
    if t.keep_checkpoints < 0:
        bad(f"training.keep_checkpoints must be ≥ 0, got {t.keep_checkpoints}", "0 keeps every checkpoint")
    if t.num_samples < 0:
        bad(f"training.num_samples must be ≥ 0, got {t.num_samples}", "0 writes no sample grid")
    if not 0 <= t.seed <= MAX_SEED:
        bad(f"seed {t.seed} is outside [0, 2**63 - 1]", "use a non-negative seed that fits in 63 bits, e.g. --seed 0")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        bad(f"unknown mixed_precision {t.mixed_precision!r}", "choose no, fp16 or bf16")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        bad(f"ema_decay {t.ema_decay} is outside (0, 1)", "use e.g. --ema 0.999")


def _check_dst(d: DST) -> None:
    if d.delta_t < 1:
        raise SurgeonError(f"delta_t must be ≥ 1, got {d.delta_t}", "fix the recipe or the flag")
    if not 0.0 <= d.p <= 1.0:
        raise SurgeonError(f"prune-and-regrow fraction p={d.p} is outside [0, 1]", "use e.g. --p 0.05")
    if d.p_decay not in ("cosine", "constant"):
        raise SurgeonError(f"unknown p_decay {d.p_decay!r}", "choose cosine or constant")
    if not 0.0 < d.stop_fraction <= 1.0:
        raise SurgeonError(f"stop_fraction {d.stop_fraction} is outside (0, 1]", "fix the recipe or the flag")


def _check_prune(r: Recipe) -> None:
    p = r.prune
    if p.method not in PRUNE_METHODS:
        raise SurgeonError(f"unknown prune method {p.method!r}", f"choose one of: {', '.join(PRUNE_METHODS)}")
    if p.calib < 1:
        raise SurgeonError(f"prune.calib must be ≥ 1, got {p.calib}", "calibrate on some examples, e.g. 128")
    if not p.damp > 0:
        raise SurgeonError(f"prune.damp must be > 0, got {p.damp}", "SparseGPT's default is 0.01")
    if p.batch_size < 1 or p.block_size < 1:
        raise SurgeonError("prune.batch_size and prune.block_size must be ≥ 1", "e.g. batch_size: 16, block_size: 128")
    m = parse_nm(r.nm)[1]
    if p.block_size % m:
        raise SurgeonError(f"prune.block_size {p.block_size} is not a multiple of M={m}", "use e.g. 128")
    if not _TIMESTEP_SCHEME.match(p.timesteps):
        raise SurgeonError(f"unknown timestep scheme {p.timesteps!r}", "use uniform, weighted or K-stratified")
    if r.stages:
        raise SurgeonError("prune: and progressive stages do not combine", "prune to the final pattern, no stages")
    if r.init != "pretrained":
        raise SurgeonError("prune: needs init: pretrained", "one-shot pruning starts from trained weights")


def _check_stages(r: Recipe) -> None:
    """Stages tighten strictly (each keeps a smaller fraction N/M), end at the recipe's nm and fill training.steps."""
    hint = "write stages that tighten, e.g. --stages 7:8,3:4,2:4"
    if not r.stages:
        raise SurgeonError("stages is empty", hint)
    patterns = [parse_nm(s.nm) for s in r.stages]
    for s in r.stages:
        if s.steps < 1:
            raise SurgeonError(f"stage {s.nm} has {s.steps} steps; every stage needs ≥ 1", "give each stage some steps")
    for (a, sa), (b, sb) in zip(zip(patterns, r.stages), zip(patterns[1:], r.stages[1:])):
        if b[0] * a[1] >= a[0] * b[1]:  # N_b/M_b >= N_a/M_a, compared exactly
            raise SurgeonError(
                f"stages must tighten, but {sb.nm} keeps as much as or more than {sa.nm} before it", hint
            )
    if parse_nm(r.nm) != patterns[-1]:
        raise SurgeonError(
            f"the last stage ({r.stages[-1].nm}) must be the recipe's nm ({r.nm})",
            "end the stages with the target pattern",
        )
    total = sum(s.steps for s in r.stages)
    if total != r.training.steps:
        raise SurgeonError(
            f"stages add up to {total} steps but training.steps is {r.training.steps}",
            "make them agree; --stages with --steps splits the steps evenly",
        )


def split_stages(patterns: list[str], steps: int) -> list[dict]:
    """``--stages 7:8,3:4,2:4`` with ``--steps``: equal stages, the remainder going to the last."""
    if not patterns or steps < len(patterns):
        raise SurgeonError(
            f"cannot split {steps} steps into {len(patterns)} stages", "pass more --steps or fewer stages"
        )
    each = steps // len(patterns)
    return [
        {"nm": p, "steps": each + (steps - each * len(patterns) if i == len(patterns) - 1 else 0)}
        for i, p in enumerate(patterns)
    ]


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML that reads ``nm: 2:4`` as the string "2:4" (YAML 1.1 reads it as the base-60 integer 124)."""


_RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _digit in "0123456789":
    _RecipeLoader.yaml_implicit_resolvers.setdefault(_digit, []).insert(
        0, ("tag:yaml.org,2002:str", re.compile(r"^[0-9]+:[0-9]+$"))
    )


def shipped() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("surgeon.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(ref: str | os.PathLike) -> Recipe:
    """A shipped recipe name (``rigl``) or a path to a YAML file."""
    ref = str(ref)
    path = Path(ref)
    if ref.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise SurgeonError(f"recipe file {ref} does not exist", f"shipped recipes: {', '.join(shipped())}")
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("surgeon.recipes") / f"{ref}.yaml"
        if not res.is_file():
            raise SurgeonError(f"unknown recipe {ref!r}", f"use one of {', '.join(shipped())} or a path to a YAML file")
        text, source = res.read_text(), f"recipe {ref!r}"
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SurgeonError(f"{source} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
    recipe = Recipe.from_dict(data or {}, source)
    return recipe if recipe.name else recipe.override(name=path.stem if path.suffix else ref)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
