"""Layer budgets: how a global sparsity S is split across layers.

uniform: every layer keeps 1 - S.
er:  density_l ∝ (n_in + n_out) / (n_in · n_out)                        (Mocanu et al., 2018)
erk: density_l ∝ ((n_in + n_out + Σ kernel) / (n_in · n_out · Π kernel)) ** power_scale   (Evci et al., 2020)

The ε that meets the global budget is solved in closed form; a layer whose density would exceed 1 is made dense,
leaves the budget, and the solve repeats, exactly as the reference RigL implementation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from surgeon.errors import SurgeonError


def _raw_er(shape: Sequence[int], power_scale: float) -> float:
    # ER ignores kernel sizes: channels only, like the reference RigL code (n_in, n_out = shape[-2:] of a TF kernel)
    n_out, n_in = shape[0], shape[1]
    return (n_in + n_out) / (n_in * n_out)


def _raw_uniform(shape: Sequence[int], power_scale: float) -> float:
    return 1.0


def _raw_erk(shape: Sequence[int], power_scale: float) -> float:
    return (sum(shape) / math.prod(shape)) ** power_scale


def check_sparsity(sparsity: float) -> float:
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or math.isnan(sparsity)
        or not 0.0 <= sparsity < 1.0
    ):
        raise SurgeonError(
            f"sparsity {sparsity!r} is outside [0, 1)", "pass a fraction of weights to remove, e.g. 0.5 or 0.9"
        )
    return float(sparsity)


def check_power_scale(power_scale: float) -> float:
    """ERK's exponent: finite and ≥ 0 (0 makes every raw score 1, i.e. uniform). NaN would never meet the budget."""
    if isinstance(power_scale, bool) or not isinstance(power_scale, (int, float)):
        raise SurgeonError(
            f"power_scale must be a number, got {power_scale!r}", "use e.g. power_scale=1.0 (the paper's ERK)"
        )
    if not math.isfinite(power_scale) or power_scale < 0:
        raise SurgeonError(
            f"power_scale {power_scale!r} must be a finite number ≥ 0", "use e.g. power_scale=1.0 (the paper's ERK)"
        )
    return float(power_scale)


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    power_scale: float = 1.0,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Return ``{name: density}`` whose parameter-weighted mean is ``1 - sparsity``.

    ``overrides`` pins layers to a given density (1.0 = dense); the rest share what is left of the budget.
    """
    sparsity = check_sparsity(sparsity)
    power_scale = check_power_scale(power_scale)
    if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
        raise SurgeonError(
            f"unknown distribution {distribution!r}", f"choose one of: {', '.join(sorted(DISTRIBUTIONS))}"
        )
    overrides = dict(overrides or {})
    for name, d in overrides.items():
        if name not in shapes:
            raise SurgeonError(
                f"density override for unknown layer {name!r}", "name a target tensor FQN from `surgeon inspect`"
            )
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise SurgeonError(
                f"density override {d!r} for {name!r} is outside [0, 1]", "use a density between 0 and 1"
            )
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if distribution == "uniform" and not overrides:
        return {n: 1.0 - sparsity for n in shapes}

    # uniform with overrides is the same solve with equal raw scores: the other layers share what is left
    raw_fn = DISTRIBUTIONS[distribution] or _raw_uniform
    raw = {n: raw_fn(s, power_scale) for n, s in shapes.items()}
    fixed = dict(overrides)
    while True:
        # rhs: weights the free layers must keep; divisor: Σ raw_l · n_l over free layers
        rhs = sum((1.0 - sparsity) * sizes[n] for n in shapes) - sum(fixed[n] * sizes[n] for n in fixed)
        free = [n for n in shapes if n not in fixed]
        if rhs < -0.5:  # tolerance: half a weight of float noise
            raise SurgeonError(
                f"density overrides keep more weights than sparsity {sparsity} allows",
                "lower the overrides or the sparsity",
            )
        if not free:
            if rhs > 0.5:  # every other layer is already dense and the budget is still not spent
                raise SurgeonError(
                    f"density overrides keep fewer weights than sparsity {sparsity} needs, even with every other layer dense",
                    "raise the overrides or the sparsity",
                )
            break
        divisor = sum(raw[n] * sizes[n] for n in free)
        eps = max(rhs, 0.0) / divisor
        max_raw = max(raw[n] for n in free)
        if eps * max_raw <= 1.0:
            break
        for n in free:
            if raw[n] == max_raw:
                fixed[n] = 1.0
    out = {}
    for n in shapes:
        out[n] = fixed[n] if n in fixed else eps * raw[n]
    return out


DISTRIBUTIONS = {"uniform": None, "er": _raw_er, "erk": _raw_erk}
