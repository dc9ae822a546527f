"""Dynamic sparse training, Algorithm 2 of the paper: MagRan-DM and RigL-DM.

Every ΔT_e steps each masked layer drops the fraction p of its active weights with the lowest :meth:`drop_scores`
(|w|) and grows the same number among the positions inactive after the drop, by :meth:`grow_scores`: MagRan at
random, RigL where the dense gradient |dL/dW_effective| is largest. RigL differs from MagRan only in
:meth:`grow_scores` (as in jaxpruner, where SET/RigL/SNFS override the drop and grow scores and nothing else).

Counts are exact. As in the reference RigL code (and rigl-torch), a position that is dropped and grown back in the
same update is no change at all: it keeps its value, optimizer state and EMA. Only truly new connections start at
0, and the loop zeroes optimizer state and EMA at every position not active both before and after the update (the
truly dropped, the truly new, and the pruned ones: at RigL's capture step the optimizer stepped on the whole
gradient, which leaves the kept positions exactly as a masked one would, AdamW being elementwise).

Under FSDP2 the scores and top-k of each layer are computed on its gathered whole tensor (RigL's dense gradient is
whole already: it is captured from the gathered weight's backward), so every rank draws the same masks; each rank
then writes its own shard of the weight.
"""

from __future__ import annotations

import torch

from surgeon import seeding
from surgeon.algorithms.base import Algorithm
from surgeon.errors import SurgeonError
from surgeon.masking.shards import full
from surgeon.masking.surgery import Site, sites
from surgeon.masking.zeroing import zero_at_
from surgeon.sparsity.patterns import topk_mask
from surgeon.sparsity.schedules import drop_fraction, is_update_step
from surgeon.sparsity.scratch import buffer


class MagRan(Algorithm):
    name = "magran"
    changes_masks = True

    def __init__(self, recipe, total_steps: int):
        super().__init__(recipe, total_steps)
        # set here, not in setup(): the loop restores it from a checkpoint (load_state_dict) before setup()
        self.history: list[dict] = []

    def setup(self, model, accelerator) -> None:
        super().setup(model, accelerator)
        self.sites = {f: s for f, s in sites(model).items() if not s.is_nm}
        self.updating = False

    def is_update(self, step: int) -> bool:
        d = self.recipe.dst
        return is_update_step(step, d.delta_t, self.total_steps, d.stop_fraction)

    def begin_step(self, step: int) -> None:
        self.updating = self.is_update(step)

    def fraction_at(self, step: int) -> float:
        d = self.recipe.dst
        return drop_fraction(step, d.p, self.total_steps, d.stop_fraction, d.p_decay)

    @staticmethod
    def moving(site: Site, frac: float) -> int:
        """How many of the site's active weights an update with drop fraction ``frac`` drops (and grows)."""
        return int(frac * int(torch.count_nonzero(site.mask)))

    def skip_optimizer_step(self, step: int) -> bool:
        return self.updating and self.recipe.dst.skip_optimizer_step

    def drop_scores(self, site: Site) -> torch.Tensor:
        """Higher = kept first among the active weights. Magnitude, as Algorithm 2 of the paper prescribes."""
        w = full(site.original)
        return torch.abs(w, out=buffer("dst.drop", w.shape, w.dtype, w.device))  # read before the next layer's

    def grow_scores(self, site: Site, generator: torch.Generator) -> torch.Tensor | None:
        """Higher = grown first. MagRan: i.i.d. uniform, drawn from a generator seeded identically on every process."""
        shape = site.original.shape
        drawn = torch.rand(shape, generator=generator, out=buffer("dst.grow", shape, torch.float32, "cpu"))
        return drawn.to(site.original.device)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> dict[str, torch.Tensor]:
        if not self.updating:
            return {}
        frac = self.fraction_at(step)
        generator = seeding.generator(self.recipe.training.seed, step)
        resets, moved = {}, 0
        for fqn, site in self.sites.items():
            w, mask = site.original, site.mask.clone()  # set_mask below writes the buffer in place
            k = int(torch.count_nonzero(mask))
            n = int(frac * k)
            scores = self.grow_scores(site, generator)  # drawn for every layer so the random stream stays aligned
            if n == 0 or scores is None:
                continue
            keep = topk_mask(self.drop_scores(site), k - n, among=mask)
            grow = topk_mask(scores, n, among=~keep)  # just-dropped positions may return
            new_mask = keep | grow
            new = grow & ~mask  # truly new connections; a dropped-and-regrown position is unchanged
            site.set_mask(new_mask)  # zeroes what it prunes; under FSDP2 each rank writes its own shard only
            zero_at_(w, new)
            # every position not active both before and after: the truly dropped and the truly new, and the pruned
            # ones, where RigL's capture step let the optimizer read the whole gradient (Mask.take_dense_grad)
            resets[fqn] = ~(mask & new_mask)
            moved += int(torch.count_nonzero(new))  # a bool sum runs several times slower on CPU
        self.history.append({"step": step, "p": frac, "regrown": moved})
        self.end_update()
        return resets

    def end_update(self) -> None:
        self.updating = False

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


class RigL(MagRan):
    name = "rigl"

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        frac = self.fraction_at(step) if self.updating else 0.0
        for site in self.sites.values():
            # only a layer the update will move needs its dense gradient (and lets the optimizer see it whole)
            site.parametrization.capture_grad = self.updating and self.moving(site, frac) > 0
            site.parametrization.dense_grad = None

    def after_backward(self, step: int) -> None:
        if not self.updating:
            return
        for site in self.sites.values():
            if not site.parametrization.capture_grad:
                continue
            g, averaged = site.parametrization.take_dense_grad(site.original)
            if g is None:  # the layer took no part in this step's forward
                g = torch.zeros(site.original.shape, dtype=torch.float32, device=site.mask.device)
            # averaged over processes so every rank ranks the same scores and grows the same positions
            site.parametrization.dense_grad = g if averaged else self.accelerator.reduce(g, reduction="mean")

    def grow_scores(self, site: Site, generator: torch.Generator) -> torch.Tensor | None:
        dense = site.parametrization.dense_grad
        if dense is None:  # not captured: the update moves none of this layer's weights
            return None
        held = site.original.grad
        if held is not None and held.data_ptr() == dense.data_ptr():
            # the parameter's own gradient (Mask.take_dense_grad): zero_grad without set_to_none zeroes it in place
            raise SurgeonError(
                f"RigL's dense gradient of {site.fqn} is still the parameter's .grad at the mask update",
                "call optimizer.zero_grad(set_to_none=True) between optimizer.step() and after_optimizer_step()",
            )
        return dense.abs_()  # the capture's own tensor, read once

    def end_update(self) -> None:
        super().end_update()
        for site in self.sites.values():
            site.parametrization.capture_grad = False
            site.parametrization.dense_grad = None
