"""N:M fine-tuning (SparseDM §3.1–3.2): straight-through (STE, SR-STE) and the fixed-mask ASP baseline.

NMSTE: each NMMask recomputes S(W) every forward and SR-STE acts in its backward, so a single-stage run needs no
per-step hook. Progressive stages (eq. 12–14) tighten the pattern at stage boundaries: the switch changes only
the pattern; weights, optimizer state and EMA carry on. The teacher loss lives in surgeon.training.objectives.
NMFixed (ASP): the magnitude N:M mask is drawn once by ``prepare`` and stays fixed, like Static.
"""

from __future__ import annotations

from surgeon.algorithms.base import Algorithm
from surgeon.masking.surgery import Site, sites
from surgeon.sparsity.patterns import nm_skip_reason
from surgeon.sparsity.schedules import stage_at


def set_pattern(site: Site, n: int, m: int) -> bool:
    """Give an N:M site the pattern n:m; a layer whose reduction size M does not divide stays dense for now.

    Returns True when the layer takes the pattern. (It divides the final M: the plan only converts such layers.)
    """
    p = site.parametrization
    if nm_skip_reason(tuple(site.original.shape), m):
        p.n = p.m  # N = M keeps every weight
        return False
    p.n, p.m = n, m
    return True


class NMSTE(Algorithm):
    name = "nm_ste"
    mask_init = "magnitude"

    def __init__(self, recipe, total_steps: int):
        super().__init__(recipe, total_steps)
        self.stages = recipe.stage_steps  # [((n, m), steps), ...]
        self.current: int | None = None

    def setup(self, model, accelerator) -> None:
        super().setup(model, accelerator)
        self.sites = {f: s for f, s in sites(model).items() if s.is_nm}
        self.current = None

    def stage_starting_at(self, step: int) -> int | None:
        """The stage that begins with ``step`` when it is not the first one (a switch), else None."""
        if len(self.stages) < 2:
            return None
        lengths = [n for _, n in self.stages]
        i = stage_at(step, lengths)
        return i if step > 1 and i != stage_at(step - 1, lengths) else None

    def begin_step(self, step: int) -> None:
        if len(self.stages) < 2:
            return
        i = stage_at(step, [n for _, n in self.stages])
        if i != self.current:  # a switch, or the first step of this process (a fresh or resumed run)
            (n, m), _ = self.stages[i]
            for site in self.sites.values():
                set_pattern(site, n, m)
            self.current = i

    def stage_event(self, i: int) -> dict:
        """What a switch to stage ``i`` logs."""
        (n, m), steps = self.stages[i]
        prev_n, prev_m = self.stages[i - 1][0]
        return {"stage": i + 1, "from": f"{prev_n}:{prev_m}", "to": f"{n}:{m}", "steps": steps}


class NMFixed(Algorithm):
    """ASP: the magnitude N:M mask, drawn once, fixed during fine-tuning (one-shot: no steps at all)."""

    name = "nm_fixed"
    mask_init = "magnitude"
