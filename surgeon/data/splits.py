"""The names of the data splits."""

from __future__ import annotations

from surgeon.errors import SurgeonError

_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation"}


def canonical_split(split: str) -> str:
    """ "train" or "validation" ("val" is accepted for the latter)."""
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise SurgeonError(f"unknown split {split!r}", "use 'train' or 'validation'") from None
