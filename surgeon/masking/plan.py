"""A plan says, for each target tensor, what it keeps: a density (unstructured) or an N:M pattern.

Plans are plain data: inspectable, JSON round-trippable, stored in every saved model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from surgeon.errors import SurgeonError, check_module
from surgeon.masking.targets import find_targets
from surgeon.sparsity.distributions import check_sparsity, layer_densities
from surgeon.sparsity.patterns import nm_skip_reason, parse_nm


@dataclass
class LayerPlan:
    kind: str
    shape: tuple[int, ...]
    density: float | None = None  # unstructured: fraction kept
    nm: tuple[int, int] | None = None  # structured: N of every M kept

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def kept(self) -> int:
        """Exact number of kept weights (N:M: N/M of the tensor)."""
        if self.nm is not None:
            return self.numel // self.nm[1] * self.nm[0]
        k = round(self.density * self.numel)
        return max(k, 1) if self.density > 0 else 0

    @property
    def is_dense(self) -> bool:
        return self.nm is None and self.kept == self.numel


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    skipped: dict[str, str] = field(default_factory=dict)  # fqn → reason
    sparsity: float | None = None
    distribution: str | None = None
    nm: tuple[int, int] | None = None

    @property
    def total(self) -> int:
        return sum(lp.numel for lp in self.layers.values())

    @property
    def kept(self) -> int:
        return sum(lp.kept for lp in self.layers.values())

    def fixed_nm(self) -> Plan:
        """The N:M layers as fixed masks of density N/M (ASP): masks given once, never recomputed."""
        layers = {
            f: LayerPlan(lp.kind, lp.shape, density=lp.nm[0] / lp.nm[1]) if lp.nm else lp
            for f, lp in self.layers.items()
        }
        return Plan(layers, dict(self.skipped), self.sparsity, self.distribution, self.nm)

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "nm": list(self.nm) if self.nm else None,
            "layers": {
                k: {**asdict(v), "shape": list(v.shape), "nm": list(v.nm) if v.nm else None}
                for k, v in self.layers.items()
            },
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        try:
            layers = {
                k: LayerPlan(v["kind"], tuple(v["shape"]), v.get("density"), tuple(v["nm"]) if v.get("nm") else None)
                for k, v in d["layers"].items()
            }
            return cls(
                layers,
                dict(d.get("skipped", {})),
                d.get("sparsity"),
                d.get("distribution"),
                tuple(d["nm"]) if d.get("nm") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SurgeonError(
                f"malformed sparsity plan ({e})", "the file was not written by surgeon or is damaged"
            ) from None


def plan(
    model: nn.Module,
    sparsity: float | None = None,
    nm: str | tuple[int, int] | None = None,
    distribution: str = "erk",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    dense_first: bool = False,
    dense_last: bool = False,
    power_scale: float = 1.0,
    overrides: Mapping[str, float] | None = None,
) -> Plan:
    """Decide what each target keeps. Give exactly one of ``sparsity`` (with a ``distribution``) or ``nm``."""
    check_module(model)
    if (sparsity is None) == (nm is None):
        raise SurgeonError(
            "give exactly one of sparsity or nm", "e.g. plan(model, sparsity=0.5) or plan(model, nm='2:4')"
        )
    targets = find_targets(model, include, exclude, dense_first, dense_last)
    if not targets:
        raise SurgeonError(
            "no target layers found", "check --include/--exclude; targets are Linear, Conv and RNN weights"
        )
    if nm is not None:
        n, m = parse_nm(nm)
        layers, skipped = {}, {}
        for fqn, t in targets.items():
            reason = nm_skip_reason(t.shape, m)
            if reason:
                skipped[fqn] = reason
            else:
                layers[fqn] = LayerPlan(t.kind, t.shape, nm=(n, m))
        return Plan(layers, skipped, nm=(n, m))
    sparsity = check_sparsity(sparsity)
    dens = layer_densities({f: t.shape for f, t in targets.items()}, sparsity, distribution, power_scale, overrides)
    layers = {f: LayerPlan(t.kind, t.shape, density=dens[f]) for f, t in targets.items()}
    return Plan(layers, {}, sparsity=sparsity, distribution=distribution)
