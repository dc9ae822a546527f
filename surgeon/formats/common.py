"""What every export format shares: options, dtypes, the per-layer table rows, and dense weights from a file."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgeon.errors import SurgeonError, UsageError
from surgeon.formats.packed import build, match_state
from surgeon.masking.surgery import sites
from surgeon.masking.targets import find_targets

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}", f"choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Options:
    """How to export: what ``surgeon export`` and ``surgeon.export`` pass every format's ``write``."""

    dtype: torch.dtype | None = None
    force: bool = False
    pipeline: str | None = None  # dense only: the latent pipeline folder to write around the denoiser
    prune: bool = False  # semi-structured only: one-shot magnitude 2:4 where a tensor is not 2:4 yet
    layers: str = "auto"  # csr only: "auto" (measured per layer) or "all"
    example: Callable[[nn.Module], Any] | None = None  # csr: one denoising step of the model, for measuring
    progress: bool = True  # progress bars on stderr for long work
    recipe: Any = None  # carried over from the source's metadata
    extra: Mapping[str, Any] = field(default_factory=dict)
    owned: bool = False  # the writer may change the model (loaded for this export): fold it in place, no copy


@dataclass
class Row:
    """One line of the export table: a target weight, how it is stored, its bytes, and how it computes."""

    name: str
    kind: str
    shape: tuple[int, ...]
    storage: str  # dense | values+mask | 2:4 | csr
    bytes: int
    runs: str  # dense | 2:4 (CUDA) | csr
    note: str = ""


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def target_kinds(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{fqn: (kind, shape)}`` of every target weight (the one graph walker's view)."""
    return {fqn: (t.kind, tuple(t.shape)) for fqn, t in find_targets(model).items()}


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bool mask of every masked tensor, taken before the masks are folded away."""
    return {fqn: site.mask.detach().to("cpu", copy=True) for fqn, site in sites(model).items()}


def build_plain(meta: Mapping, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The recorded model class with ``state`` loaded (checked first: every tensor, every shape)."""
    model = build(meta, state)
    match_state(model, state, {}, meta["file"])
    model.load_state_dict(dict(state))
    return model.eval()


def damaged(meta: Mapping, what: str) -> SurgeonError:
    return SurgeonError(f"{meta['file']} is corrupt: {what}", "export the model again")
