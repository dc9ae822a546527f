"""Pure schedule functions for dynamic sparse training (step numbers count completed optimizer steps from 1)."""

from __future__ import annotations

import math


def stop_step(total_steps: int, stop_fraction: float) -> int:
    """Last step at which masks may change."""
    return int(total_steps * stop_fraction)


def is_update_step(step: int, delta_t: int, total_steps: int, stop_fraction: float) -> bool:
    """Algorithm 2, line 8: update after every ΔT_e-th step, until the stop step."""
    return step > 0 and step % delta_t == 0 and step <= stop_step(total_steps, stop_fraction)


def drop_fraction(step: int, p: float, total_steps: int, stop_fraction: float, decay: str = "cosine") -> float:
    """Prune-and-regrow fraction at ``step``: constant p, or p·½(1 + cos(π·step/stop)) as in RigL."""
    if decay == "constant":
        return p
    end = max(stop_step(total_steps, stop_fraction), 1)
    return p * 0.5 * (1.0 + math.cos(math.pi * min(step, end) / end))


def stage_at(step: int, lengths: list[int]) -> int:
    """Index of the progressive stage that optimizer step ``step`` (from 1) belongs to; the last stage runs on."""
    end = 0
    for i, n in enumerate(lengths):
        end += n
        if step <= end:
            return i
    return len(lengths) - 1
