"""surgeon: model surgery for diffusion models.

Load a model, plan what each weight keeps, inject mask parametrizations in place, train, save packed::

    model = surgeon.load_model("tiny-unet")
    surgeon.inject(model, surgeon.plan(model, sparsity=0.9))
    surgeon.save(model, "out/")

Importing surgeon does not import diffusers; the functions that need it import it when called.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffusion-surgeon")
except PackageNotFoundError:  # a bare checkout on sys.path, not installed
    __version__ = "0+unknown"

from .errors import SurgeonError
from .packed import load, load_into, save
from .loading import load_model
from .plan import plan
from .report import report
from .surgery import fold, inject, remove
from .targets import find_targets

__all__ = [
    "SurgeonError",
    "__version__",
    "find_targets",
    "fold",
    "inject",
    "load",
    "load_into",
    "load_model",
    "plan",
    "remove",
    "report",
    "save",
]
