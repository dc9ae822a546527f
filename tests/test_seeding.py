"""The one seed derivation: every stream's seed is a function of the run's seed and the stream's coordinates, in
torch's seed range however large the run's seed, and distinct streams get distinct seeds."""

from __future__ import annotations

import pytest
import torch

from surgeon.recipe import MAX_SEED
from surgeon.seeding import derive_seed, generator, seeded

SEEDS = [0, 1, 12345, 2**31, 2**62 + 7, MAX_SEED - 1, MAX_SEED]
INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("seed", SEEDS)
def test_derived_seeds_stay_in_torchs_signed_64_bit_range(seed):
    # the coordinates the loop and the algorithms pass: (seed, step), (seed, step, process, micro-batch), ...
    for parts in [(seed,), (seed, 10**6), (seed, 99, 7), (seed, 123_456, 3, 1), (seed, 2**40, 2**20, 2**10, 5)]:
        derived = derive_seed(*parts)
        assert 0 <= derived <= INT64_MAX, (parts, derived)
        torch.Generator().manual_seed(derived)


def test_derivation_separates_steps_processes_and_run_seeds():
    top = MAX_SEED
    assert len({derive_seed(top, step) for step in range(1000)}) == 1000
    assert len({derive_seed(top, 5, rank) for rank in range(64)}) == 64
    assert len({derive_seed(seed, 5) for seed in SEEDS}) == len(SEEDS)
    assert derive_seed(top, 3, 1) != derive_seed(top, 1, 3)  # coordinates are ordered, not summed


def test_generators_and_seeded_blocks_take_the_largest_seed_and_repeat_exactly():
    a = torch.randn(4, generator=generator(MAX_SEED, 17))
    b = torch.randn(4, generator=generator(MAX_SEED, 17))
    assert torch.equal(a, b) and not torch.equal(a, torch.randn(4, generator=generator(MAX_SEED, 18)))
    before = torch.random.get_rng_state()
    with seeded(MAX_SEED):
        first = torch.randn(3)
    with seeded(MAX_SEED):
        assert torch.equal(torch.randn(3), first)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's global RNG is left as it was


def test_a_seed_below_the_modulus_seeds_its_generator_as_itself():
    # models seeded in their config (ChiroDiff's Fourier features) rebuild the same weights as before the
    # derivation went through this function
    for seed in [0, 7, 2**40]:
        assert derive_seed(seed) == seed
        assert torch.equal(
            torch.randn(3, generator=generator(seed)), torch.randn(3, generator=torch.Generator().manual_seed(seed))
        )


def test_every_generator_in_the_library_is_seeded_through_derive_seed():
    """A generator seeded with a raw or hand-combined value is how the large-seed overflow came in."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "surgeon"
    raw = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "manual_seed":
                arg = node.args[0] if node.args else None
                name = getattr(getattr(arg, "func", None), "id", None) or getattr(
                    getattr(arg, "func", None), "attr", None
                )
                if name != "derive_seed":
                    raw.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not raw, f"seed these through surgeon.seeding.generator or derive_seed: {raw}"
