"""Sparse training algorithms: small classes that hook into the training loop at named points.

A plain dict registry; add an entry here when you add an algorithm.
"""

from surgeon.algorithms.base import Algorithm
from surgeon.algorithms.dst import MagRan, RigL
from surgeon.algorithms.nm_ste import NMSTE, NMFixed
from surgeon.algorithms.static import Dense, Static

ALGORITHMS: dict[str, type[Algorithm]] = {
    "dense": Dense,
    "static": Static,
    "magran": MagRan,
    "rigl": RigL,
    "nm_ste": NMSTE,
    "nm_fixed": NMFixed,
}

__all__ = ["ALGORITHMS", "Algorithm", "Dense", "MagRan", "NMFixed", "NMSTE", "RigL", "Static"]
