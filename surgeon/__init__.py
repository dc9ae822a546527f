"""surgeon: model surgery for diffusion models.

Load a model, plan what each weight keeps, inject mask parametrizations in place, train, save packed::

    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.9))
    surgeon.save(model, "out/")

Importing surgeon is light: the public functions (and torch behind them) load on first use, so the ``surgeon``
command can take Ctrl-C from its first instant, and importing surgeon never imports diffusers.
"""
from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffusion-surgeon")
except PackageNotFoundError:  # a bare checkout on sys.path, not installed
    __version__ = "0+unknown"

from .errors import SurgeonError

# public name → the module that defines it, imported on first access (PEP 562)
_PUBLIC = {
    "evaluate": ".evaluate",
    "export": ".exporting",  # the function; the formats live in the subpackage surgeon.export (see _Package)
    "find_targets": ".targets",
    "finetune": ".run",
    "fold": ".surgery",
    "inject": ".surgery",
    "load": ".export",
    "load_into": ".packed",
    "load_model": ".loading",
    "measure": ".measure",
    "plan": ".plan",
    "remove": ".surgery",
    "report": ".report",
    "save": ".packed",
    "sparsify": ".run",
}

__all__ = ["SurgeonError", "__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    else:  # a submodule, as ``import surgeon; surgeon.surgery`` worked when everything loaded eagerly
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _Package(types.ModuleType):
    """``surgeon.plan``, ``surgeon.report`` and ``surgeon.export`` name both a function and a submodule. Importing the submodule sets
    the package attribute to the module; the eager ``from .plan import plan`` used to overwrite it back. Lazily,
    the function must win by refusing that binding."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
