"""Model architectures surgeon ships itself (anything from diffusers is loaded, not defined, here).

Its classes are diffusers models, so a saved config names them by ``_class_name`` alone. They load on first use:
importing surgeon.models (as loading and the presets do) never imports diffusers.
"""

from __future__ import annotations

import importlib

_CLASSES = {"ChiroDiffNet": "surgeon.models.chirodiff"}
__all__ = sorted(_CLASSES)


def __getattr__(name: str):
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_CLASSES[name]), name)
