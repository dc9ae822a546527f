"""The one graph walker: which weight tensors of a module are sparsification targets.

Targets are weights of Linear, Conv1d/2d/3d (and subclasses, e.g. diffusers' LoRA-compatible layers) and every
``weight_ih_l*`` / ``weight_hh_l*`` tensor of RNN/GRU/LSTM modules, all layers and directions. Biases, norms,
embeddings and positional embeddings are never targets.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from surgeon.errors import SurgeonError, check_arg, check_module

_RNN_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")


@dataclass(frozen=True)
class Target:
    fqn: str  # parameter FQN, e.g. "down_blocks.0.resnets.0.conv1.weight"
    module_name: str
    tensor_name: str
    kind: str  # "linear" | "conv" | "rnn"
    shape: tuple[int, ...]
    module: nn.Module = field(compare=False, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def fan_in_out(self) -> tuple[int, int, tuple[int, ...]]:
        """(n_in, n_out, kernel) as ER/ERK count them; RNN weights are [gates*hidden, in] matrices."""
        return self.shape[1], self.shape[0], tuple(self.shape[2:])


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.RNNBase):
        return "rnn"
    return None


def _tensor_names(module: nn.Module, kind: str) -> list[str]:
    if kind == "rnn":
        names = [n for n, _ in module.named_parameters(recurse=False)]
        # a parametrized RNN weight no longer lives in named_parameters(recurse=False): look at the originals too
        if hasattr(module, "parametrizations"):
            names += list(module.parametrizations.keys())
        return sorted({n for n in names if _RNN_WEIGHT.match(n)}, key=_rnn_order(module))
    return ["weight"]


def _shape(module: nn.Module, name: str) -> tuple[int, ...]:
    """The tensor's shape without evaluating a parametrization (masks keep shapes, and evaluating costs a pass)."""
    stored = getattr(module, "parametrizations", {})
    return tuple(stored[name].original.shape if name in stored else getattr(module, name).shape)


def _rnn_order(module: nn.Module):
    order = {n: i for i, n in enumerate(getattr(module, "_flat_weights_names", []))}
    return lambda n: order.get(n, len(order))


def _compile(patterns: Iterable[str] | None, name: str):
    """FQN patterns: shell globs, or ``re:`` followed by a regular expression (searched, not anchored). One string
    is one pattern (iterating it would give one pattern per character)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns or ():
        check_arg(p, str, f"each {name} pattern", "a string (a glob, or re:REGEX)")
        if p.startswith("re:"):
            try:
                rx = re.compile(p[3:])
            except re.error as e:
                raise SurgeonError(f"invalid regular expression {p!r}: {e}", "fix the re: pattern") from None
            out.append(lambda name, rx=rx: rx.search(name) is not None)
        else:
            out.append(lambda name, p=p: fnmatch.fnmatchcase(name, p))
    return out


def _matches(fqn: str, module_name: str, preds) -> bool:
    return any(pred(fqn) or pred(module_name) for pred in preds)


def find_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    dense_first: bool = False,
    dense_last: bool = False,
) -> dict[str, Target]:
    """Walk ``model`` once and return ``{fqn: Target}`` in module registration order.

    ``include``/``exclude`` match either the tensor FQN or its module name. ``dense_first``/``dense_last`` drop the
    first/last target module (in registration order), as sparse-training papers usually keep those layers dense.
    """
    check_module(model)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    found: dict[str, Target] = {}
    for module_name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        for tname in _tensor_names(module, kind):
            fqn = f"{module_name}.{tname}" if module_name else tname
            if inc and not _matches(fqn, module_name, inc):
                continue
            if exc and _matches(fqn, module_name, exc):
                continue
            shape = _shape(module, tname)
            found[fqn] = Target(fqn, module_name, tname, kind, shape, module)
    if dense_first or dense_last:
        modules = list(dict.fromkeys(t.module_name for t in found.values()))
        drop = set()
        if dense_first and modules:
            drop.add(modules[0])
        if dense_last and modules:
            drop.add(modules[-1])
        found = {k: t for k, t in found.items() if t.module_name not in drop}
    return found
