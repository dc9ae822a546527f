"""Sparse training algorithms (small classes that hook into the training loop at named points) and the one-shot
pruners (:mod:`surgeon.algorithms.pruners`, run by :mod:`surgeon.algorithms.oneshot`).

Plain dict registries; add an entry here when you add an algorithm or a pruner.
"""

from surgeon.algorithms.base import Algorithm
from surgeon.algorithms.dst import MagRan, RigL
from surgeon.algorithms.nm_ste import NMSTE, NMFixed
from surgeon.algorithms.pruners import Magnitude, Pruner, SparseGPT, Wanda
from surgeon.algorithms.static import Dense, Static

ALGORITHMS: dict[str, type[Algorithm]] = {
    "dense": Dense,
    "static": Static,
    "magran": MagRan,
    "rigl": RigL,
    "nm_ste": NMSTE,
    "nm_fixed": NMFixed,
}

PRUNERS: dict[str, type[Pruner]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}

__all__ = [
    "ALGORITHMS",
    "PRUNERS",
    "Algorithm",
    "Dense",
    "MagRan",
    "Magnitude",
    "NMFixed",
    "NMSTE",
    "Pruner",
    "RigL",
    "SparseGPT",
    "Static",
    "Wanda",
]
