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

from surgeon.errors import SurgeonError

# public name → the module that defines it, imported on first access (PEP 562)
_PUBLIC = {
    "evaluate": "surgeon.evaluation.evaluate",
    "export": "surgeon.formats.exporter",
    "find_targets": "surgeon.masking.targets",
    "finetune": "surgeon.training.run",
    "fold": "surgeon.masking.surgery",
    "inject": "surgeon.masking.surgery",
    "load": "surgeon.formats",
    "load_into": "surgeon.formats.packed",
    "load_model": "surgeon.formats.loading",
    "measure": "surgeon.masking.measure",
    "plan": "surgeon.masking.plan",
    "prune": "surgeon.training.prune",
    "remove": "surgeon.masking.surgery",
    "report": "surgeon.masking.inspection",
    "save": "surgeon.formats.packed",
    "sparsify": "surgeon.training.run",
}

__all__ = ["SurgeonError", "__version__", *sorted(_PUBLIC)]


def __getattr__(name: str):
    if name == "__version__":  # lazy: importlib.metadata costs tens of ms before the CLI's Ctrl-C guard is up
        from surgeon.version import __version__ as value
    elif name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:  # a subpackage: ``import surgeon; surgeon.masking``
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, "__version__"})
