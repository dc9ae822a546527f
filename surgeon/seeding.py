"""Seeded randomness that leaves the caller's global torch RNG as it found it.

Library calls draw from their own seeded generators. Where a draw cannot be given a generator (module
constructors initializing weights, dropout inside a model's forward), the work runs inside :func:`own_rng`, which
restores the caller's global RNG state when it ends, so importing and calling surgeon never reseeds a user's
program behind its back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def own_rng() -> Iterator[None]:
    """Restore the global torch RNG (CPU, and every CUDA device when CUDA is available) when the body ends."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with the global CPU RNG seeded to ``seed`` (e.g. to build a model's initial weights)."""
    with own_rng():
        torch.default_generator.manual_seed(derive_seed(seed))
        yield


# the low 63 bits: every value fits a signed 64-bit seed, and no run seed the recipe accepts (0 .. 2**63 - 1)
# wraps onto another
SEED_MODULUS = 2**63


def derive_seed(*parts: int) -> int:
    """The one seed derivation of the library: a stream's seed from the run's seed and the stream's coordinates
    (step, process, micro-batch, ...). Always in torch's range, however large the run's seed."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % SEED_MODULUS
    return h


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
