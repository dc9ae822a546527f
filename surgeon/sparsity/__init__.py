"""Pure functions: layer budgets (distributions), mask patterns and schedules."""

from surgeon.sparsity.distributions import DISTRIBUTIONS, layer_densities
from surgeon.sparsity.patterns import nm_groups, nm_mask, nm_ungroup, parse_nm, random_mask, topk_mask

__all__ = [
    "DISTRIBUTIONS",
    "layer_densities",
    "nm_groups",
    "nm_mask",
    "nm_ungroup",
    "parse_nm",
    "random_mask",
    "topk_mask",
]
