"""Resumable training checkpoints: one safetensors file per checkpoint, no pickles anywhere.

It holds the full model state (originals and mask buffers), every optimizer state tensor, the EMA, the torch RNG
state, and in its JSON metadata the step, optimizer hyper-parameters, algorithm state and a model fingerprint.
Data order and diffusion noise are pure functions of (seed, step), so nothing else is needed to resume a run
bit-identically. (Accelerate's own ``save_state`` pickles optimizer and RNG state, which surgeon never loads.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon.errors import SurgeonError, brief
from surgeon.io.atomic import atomic_path
from surgeon.io.container import DIGESTS, corrupt_metadata, digests, parse_entry, readable_path, verify_digests
from surgeon.masking.shards import full, is_sharded, like

FORMAT = "surgeon.checkpoint/1"
_JSON_ENTRIES = {"param_names": list, "param_groups": list, "optim_scalars": dict, "algorithm": dict, "extra": dict}
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


def fingerprint(model: nn.Module) -> str:
    """Class name plus every state tensor's name and shape: two checkpoints of one model share it."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def save_checkpoint(
    path: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    algorithm_state: dict,
    ema=None,
    extra: dict | None = None,
    algorithm: str | None = None,
    loss_window: torch.Tensor | None = None,
    write: bool = True,
) -> Path:
    """``algorithm`` names the recipe's algorithm (resume refuses another); ``loss_window`` holds the per-micro-batch
    losses not yet logged, so a resumed run logs the same means as an uninterrupted one.

    The file holds whole tensors: those of a model sharded with FSDP2 are gathered, so every rank calls this and
    only one passes ``write``; the checkpoint is the same file a single process would write."""
    tensors = {f"model.{k}": _whole(v) for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_names[idx]}.{key}"] = _whole(value)
            else:
                scalars[f"{param_names[idx]}.{key}"] = value
    if ema is not None:
        tensors.update({f"ema.{k}": _whole(v) for k, v in ema.state_dict().items()})
    if not write:
        return path
    tensors["rng.torch"] = torch.get_rng_state()
    if loss_window is not None and loss_window.numel():
        tensors["train.loss_window"] = loss_window.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    meta = {
        "format": FORMAT,
        "step": str(step),
        "algorithm_name": algorithm or "",
        "fingerprint": fingerprint(model),
        "param_names": json.dumps(param_names),
        "param_groups": json.dumps(groups),
        "optim_scalars": json.dumps(scalars),
        "algorithm": json.dumps(algorithm_state),
        "extra": json.dumps(extra or {}),
        DIGESTS: json.dumps(digests(tensors)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _whole(t: torch.Tensor) -> torch.Tensor:
    return full(t.detach()).contiguous()


def _laid_out_as(tensors: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from a file, each as its current counterpart is laid out (this rank's shard, when sharded)."""
    return {k: like(v, current[k]) if k in current and is_sharded(current[k]) else v for k, v in tensors.items()}


def list_checkpoints(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(folder).glob("step-*.safetensors") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: Path, keep: int) -> None:
    for p in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def resolve(ref: str | os.PathLike) -> Path:
    """A checkpoint file, a run folder or its checkpoints/ folder (→ the latest checkpoint in it)."""
    p = Path(ref)
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            found = list_checkpoints(folder)
            if found:
                return found[-1]
        raise SurgeonError(f"no checkpoint found in {p}", "point --resume at a step-N.safetensors file or a run folder")
    if not p.is_file():
        raise SurgeonError(
            f"checkpoint {p} does not exist", "point --resume at a step-N.safetensors file or a run folder"
        )
    return p


def run_folder(ref: str | os.PathLike) -> Path:
    """The run folder a checkpoint belongs to: RUN for RUN/checkpoints/step-N.safetensors, RUN/checkpoints or RUN."""
    path = resolve(ref)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def read_metadata(ref: str | os.PathLike) -> tuple[Path, dict[str, str]]:
    """Resolve ``ref`` and read its metadata only (cheap: no tensor is loaded); refuses anything but a checkpoint."""
    from safetensors import safe_open

    path = resolve(ref)
    try:
        with safe_open(readable_path(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SurgeonError(
            f"cannot read checkpoint {path} ({brief(e)})", "the file is truncated or damaged; use an earlier checkpoint"
        ) from e
    if meta.get("format") != FORMAT:
        raise SurgeonError(
            f"{path} is not a surgeon training checkpoint",
            "resume from a checkpoints/step-N.safetensors of a surgeon run",
        )
    step = meta.get("step", "")
    if not (step.isascii() and step.isdigit()):
        raise corrupt_metadata(path, "step", f"{step[:20]!r} is not a step number")
    for key, kind in _JSON_ENTRIES.items():  # every value checked where it is read, before anything is restored
        if key in meta and not isinstance(parse_entry(path, key, meta[key]), kind):
            raise corrupt_metadata(path, key, f"is not a JSON {kind.__name__}")
    return path, meta


def check_resumable(ref: str | os.PathLike, algorithm: str | None = None, steps: int | None = None) -> Path:
    """Refuse, before anything is loaded, a checkpoint made by another algorithm or one past the run's last step."""
    path, meta = read_metadata(ref)
    made_by = meta.get("algorithm_name") or None  # checkpoints written before this field existed do not say
    if algorithm is not None and made_by is not None and made_by != algorithm:
        raise SurgeonError(
            f"checkpoint {path} was made by algorithm {made_by!r}, not {algorithm!r}",
            f"resume with the recipe that made it (algorithm: {made_by}), or start a new run without --resume",
        )
    at = int(meta["step"])
    if steps is not None and at > steps:
        raise SurgeonError(
            f"checkpoint {path} is at step {at}, past the run's {steps} steps",
            f"pass --steps {at} or more to continue it, or resume from an earlier checkpoint",
        )
    return path


def load_checkpoint(
    ref,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    ema=None,
    algorithm: str | None = None,
    steps: int | None = None,
) -> tuple[int, dict, dict]:
    """Restore in place; returns (step, algorithm_state, extra). Refuses a checkpoint of another model, another
    algorithm (when ``algorithm`` is given) or past ``steps``. ``extra["loss_window"]`` holds the unlogged losses."""
    path = check_resumable(ref, algorithm, steps)
    _, meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SurgeonError(
            f"cannot read checkpoint {path} ({brief(e)})", "the file is truncated or damaged; use an earlier checkpoint"
        ) from e
    verify_digests(tensors, meta.get(DIGESTS), path)
    if meta["fingerprint"] != fingerprint(model):
        raise SurgeonError(
            f"checkpoint {path} belongs to another model", "resume with the same MODEL, recipe and sparsity settings"
        )
    if json.loads(meta["param_names"]) != param_names:
        raise SurgeonError(f"checkpoint {path} has different trainable parameters", "resume with the same recipe")
    own = model.state_dict()
    model.load_state_dict(_laid_out_as({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, own))
    index = {n: i for i, n in enumerate(param_names)}
    params = [p for g in optimizer.param_groups for p in g["params"]]  # in the order of the state dict's indices
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, slot = key[6:].rpartition(".")
            param = params[index[name]]
            state.setdefault(index[name], {})[slot] = like(value, param) if value.shape == param.shape else value
    for key, value in json.loads(meta["optim_scalars"]).items():
        name, _, slot = key.rpartition(".")
        state.setdefault(index[name], {})[slot] = value
    groups = json.loads(meta["param_groups"])
    current = optimizer.state_dict()["param_groups"]
    for g, cur in zip(groups, current):
        g["params"] = cur["params"]
        g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    torch.set_rng_state(tensors["rng.torch"])
    extra = json.loads(meta["extra"])
    if "train.loss_window" in tensors:
        extra["loss_window"] = tensors["train.loss_window"]
    return int(meta["step"]), json.loads(meta["algorithm"]), extra


def check_identity(saved: dict, current: dict) -> None:
    """Refuse to resume a run under a different identity, e.g. another teacher (compared by content digest)."""

    def key(value):
        return value.get("sha256", value) if isinstance(value, dict) else value

    def describe(value) -> str:
        if isinstance(value, dict) and "sha256" in value:
            return f"{value.get('source')} (sha256 {value['sha256'][:12]})"
        return "none" if value is None else str(value)

    for name in sorted(set(saved) | set(current)):
        if key(saved.get(name)) != key(current.get(name)):
            raise SurgeonError(
                f"the checkpoint was trained with {name} {describe(saved.get(name))}, this run has "
                f"{describe(current.get(name))}",
                f"resume with the same {name}, or start a new run",
            )
