"""Recipes: declarative YAML training settings, validated against a typed schema (unknown keys rejected by name).

A recipe is found by shipped name (``recipes/<name>.yaml``, packaged as ``surgeon.recipes``) or by path. CLI flags
override single fields after loading, through :func:`Recipe.override`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import SurgeonError

ALGORITHMS = ("dense", "static", "magran", "rigl", "nm_ste")


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


@dataclass
class Training:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    ema_decay: float | None = None  # e.g. 0.999; EMA copies follow the masks
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_batches: int = 4  # held-out denoising loss at the end (fixed noise)
    num_samples: int = 16  # images in the PNG grid
    seed: int = 0


@dataclass
class Distill:
    """SparseDM loss: λ1·‖F_s − F_t‖² + λ2·‖ε − F_s‖² with a frozen dense teacher."""

    lambda_1: float = 1.0
    lambda_2: float = 1.0


@dataclass
class Recipe:
    algorithm: str = "static"
    name: str | None = None
    description: str = ""
    sparsity: float | None = 0.5
    nm: str | None = None  # "2:4" for N:M recipes
    distribution: str = "erk"
    power_scale: float = 1.0
    dense_first: bool = False
    dense_last: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    init: str = "scratch"  # "scratch": re-initialize weights (the paper's setting) | "pretrained": keep them
    lambda_w: float = 0.0  # SR-STE decay for N:M recipes
    dst: DST = field(default_factory=DST)
    optimizer: Optimizer = field(default_factory=Optimizer)
    diffusion: Diffusion = field(default_factory=Diffusion)
    training: Training = field(default_factory=Training)
    distill: Distill | None = None

    def __post_init__(self):
        _check(self)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def override(self, **changes: Any) -> "Recipe":
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
    def from_dict(cls, d: Mapping[str, Any], source: str = "recipe") -> "Recipe":
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


def _check(r: Recipe) -> None:
    def bad(msg: str, hint: str = "fix the recipe or the flag"):
        raise SurgeonError(msg, hint)

    if r.algorithm not in ALGORITHMS:
        bad(f"unknown algorithm {r.algorithm!r}", f"choose one of: {', '.join(ALGORITHMS)}")
    if r.algorithm == "nm_ste":
        if not r.nm:
            bad("algorithm nm_ste needs an N:M pattern", "set nm: '2:4' or pass --nm 2:4")
    elif r.algorithm != "dense":
        s = r.sparsity
        if s is None or math.isnan(s) or not 0.0 <= s < 1.0:
            bad(f"sparsity {s!r} is outside [0, 1)", "pass a fraction of weights to remove, e.g. --s 0.5")
    if r.init not in ("scratch", "pretrained"):
        bad(f"unknown init {r.init!r}", "choose scratch or pretrained")
    if r.dst.delta_t < 1:
        bad(f"delta_t must be ≥ 1, got {r.dst.delta_t}")
    if not 0.0 <= r.dst.p <= 1.0:
        bad(f"prune-and-regrow fraction p={r.dst.p} is outside [0, 1]", "use e.g. --p 0.05")
    if r.dst.p_decay not in ("cosine", "constant"):
        bad(f"unknown p_decay {r.dst.p_decay!r}", "choose cosine or constant")
    if not 0.0 < r.dst.stop_fraction <= 1.0:
        bad(f"stop_fraction {r.dst.stop_fraction} is outside (0, 1]")
    t = r.training
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(t, name) < 1:
            bad(f"training.{name} must be ≥ 1, got {getattr(t, name)}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        bad(f"unknown mixed_precision {t.mixed_precision!r}", "choose no, fp16 or bf16")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        bad(f"ema_decay {t.ema_decay} is outside (0, 1)")
    if r.optimizer.lr <= 0:
        bad(f"learning rate must be > 0, got {r.optimizer.lr}")


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
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SurgeonError(f"{source} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
    recipe = Recipe.from_dict(data or {}, source)
    return recipe if recipe.name else recipe.override(name=path.stem if path.suffix else ref)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
