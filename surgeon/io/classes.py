"""Record a model's class in a saved file and find it again: ``module:Class`` paths, diffusers classes, configs.

Every writer (``surgeon.save``, every export format) records a model with :func:`config_record`, and every reader
rebuilds it with :func:`build_from_record`; the record is described in ``docs/formats.md`` ("Model config").

Loading a file never runs code the file names unless the user opts in, like diffusers' ``trust_remote_code``:
by default a record resolves only to diffusers classes and surgeon's own models. A recorded ``file.py:Class`` or
any other module is imported only inside :func:`trusting_code` (``trust_code=True``, ``--trust-code``). The check
sits in :func:`resolve_class`, the one place that imports a recorded name, so every reader path gets it; the
opt-in travels as a context variable so that readers need not thread a flag through each layout.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import sys
import types
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from torch import nn

from surgeon.errors import SurgeonError, brief

_LOAD_INTO_HINT = "build the model yourself and call surgeon.load_into(model, path)"
TRUST_HINT = (
    "if you trust this file, pass --trust-code (trust_code=True in Python); "
    "or build the model yourself and call surgeon.load_into(model, path)"
)
# modules whose classes a saved record may name without an opt-in: installed, reviewed code that builds models
OWN_MODELS = "surgeon.models"
TRUSTED_MODULES = ("diffusers", OWN_MODELS)
# inside them, modules that define no model classes of their own (presets holds builder functions)
UNTRUSTED_MODULES = ("surgeon.models.presets",)
_TRUST_CODE: ContextVar[bool] = ContextVar("surgeon_trust_code", default=False)
# module name -> file, for the files import_file imported under a made-up module name
_IMPORTED_FILES: dict[str, str] = {}
# the models surgeon built with no init arguments, so that their record says so; held weakly: nothing on the model
_BUILT_BARE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def built_without_arguments(model: nn.Module) -> nn.Module:
    """Note that surgeon built ``model`` as ``Class()``: :func:`config_record` then records ``{}``."""
    _BUILT_BARE.add(model)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, and the copy is recorded as its original is (the one copy the library makes)."""
    clone = copy.deepcopy(model)
    if model in _BUILT_BARE:
        _BUILT_BARE.add(clone)
    return clone


@contextmanager
def trusting_code(trust: bool = True) -> Iterator[None]:
    """Within this block, records may name classes from any module or file (``trust=False`` changes nothing)."""
    token = _TRUST_CODE.set(_TRUST_CODE.get() or bool(trust))
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


def is_trusted_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in TRUSTED_MODULES)


def _named_class(name: str):
    """The diffusers model class ``_class_name`` names: diffusers' own, else one of surgeon's own models."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        own = importlib.import_module(OWN_MODELS)  # a name in a record, imported as records are, by name
        cls = getattr(own, name, None) if name in own.__all__ else None
    return cls


def diffusers_class(name: str) -> type[nn.Module]:
    cls = _named_class(str(name))
    if not (
        isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and hasattr(cls, "from_config")
        and is_trusted_module(cls.__module__)
    ):
        import diffusers

        raise SurgeonError(
            f"unknown diffusers model class {name!r}", f"diffusers {diffusers.__version__} has no such model"
        )
    return cls


def is_diffusers_class(cls: type) -> bool:
    """True when ``_class_name`` alone finds ``cls`` again: a class of diffusers or one of surgeon's own diffusers
    models, not a user subclass."""
    if not cls.__module__.startswith(("diffusers.", OWN_MODELS + ".")):
        return False
    return _named_class(cls.__name__) is cls


def import_file(path: Path):
    """Import a Python file by path, once: repeated imports give the same module, hence the same classes."""
    path = Path(path).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_surgeon_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise SurgeonError(f"{path} does not exist", "give an existing path/to/file.py:Class")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling-free introspection look the module up here
    _IMPORTED_FILES[name] = str(path)  # lets class_path() record the file, as the module name is made up
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file may raise anything
        del sys.modules[name], _IMPORTED_FILES[name]
        raise SurgeonError(
            f"cannot import {path}: {type(e).__name__}: {brief(e)}", "fix the error in that file"
        ) from None
    return module


def class_path(cls: type) -> str:
    """``module:QualName``, or ``/abs/file.py:QualName`` for classes from files imported by path or run as a script."""
    file = _IMPORTED_FILES.get(cls.__module__)
    if file is None and cls.__module__ == "__main__":
        file = getattr(sys.modules.get("__main__"), "__file__", None)
    where = str(Path(file).resolve()) if file else cls.__module__
    return f"{where}:{cls.__qualname__}"


def resolve_class(spec: str, source: Path | str = "the file") -> type:
    """The inverse of :func:`class_path`. Imports only diffusers and surgeon's own models unless code is trusted;
    ``source`` names the file that recorded ``spec`` in errors.

    The allowlist is checked twice: on the module a record names (nothing else is imported) and on the class the
    name resolves to, which must itself be defined in an allowed module and be reached without passing through
    another module (``surgeon.models.chirodiff:torch.nn.Linear`` names torch's class, not surgeon's)."""
    where, _, qualname = str(spec).rpartition(":")
    if not where or not qualname:
        raise SurgeonError(f"malformed class path {spec!r}", _LOAD_INTO_HINT)
    trusted = _TRUST_CODE.get()
    if (where.endswith(".py") or not is_trusted_module(where)) and not trusted:
        what = "the Python file" if where.endswith(".py") else "the module"
        raise SurgeonError(
            f"{source} names code to run ({what} {where}, class {qualname}); nothing was run", TRUST_HINT
        )
    try:
        obj = import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
        for part in qualname.split("."):
            obj = getattr(obj, part)
            if isinstance(obj, types.ModuleType) and not trusted:
                raise SurgeonError(
                    f"{source} names class {qualname} through the module {obj.__name__}, outside {where}; "
                    "nothing was built",
                    TRUST_HINT,
                )
    except SurgeonError:
        raise
    except (ImportError, AttributeError) as e:
        raise SurgeonError(f"cannot find class {spec}: {brief(e)}", _LOAD_INTO_HINT) from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise SurgeonError(f"{spec} is not a torch.nn.Module class", _LOAD_INTO_HINT)
    if not trusted and not is_trusted_class(obj):
        raise SurgeonError(
            f"{source} names {spec}, which is {obj.__module__}.{obj.__qualname__}: code outside diffusers and "
            "surgeon's own models; nothing was built",
            TRUST_HINT,
        )
    return obj


def is_trusted_class(cls: type) -> bool:
    """A model class that loads without an opt-in: defined in diffusers or in surgeon's own model modules."""
    return is_trusted_module(cls.__module__) and cls.__module__ not in UNTRUSTED_MODULES


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeonError(f"cannot read {path}: {brief(e)}", "the file is damaged or not JSON") from None
    if not isinstance(data, dict):
        raise SurgeonError(f"{path} does not hold a JSON object", "the file is damaged")
    return data


def config_record(model: nn.Module) -> str:
    """The JSON text that finds and rebuilds ``model``'s class: diffusers' own config, else surgeon's class record.

    Other modules record ``{"_surgeon_class": "module:Class", "_surgeon_init": {...} | null}``, the init arguments
    taken from a ``model.config`` mapping, else ``{}`` for a model surgeon built with no arguments
    (:func:`built_without_arguments`; its copies through :func:`copy_model` too), else ``null``: unknown.
    """
    if is_diffusers_class(type(model)):
        return model.to_json_string()
    config = getattr(model, "config", None)
    init = dict(config) if isinstance(config, Mapping) else {} if model in _BUILT_BARE else None
    record = {"_surgeon_class": class_path(type(model)), "_surgeon_init": init}
    try:
        return json.dumps(record, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise SurgeonError(
            f"the config of {type(model).__name__} is not JSON-serializable ({e})",
            "model.config may hold only JSON values (numbers, strings, lists, dicts)",
        ) from None


def build_from_record(config: Mapping[str, Any], where: Path | str, empty: bool = False) -> nn.Module:
    """Build a fresh model (random weights) from a :func:`config_record`; ``where`` names the file in errors.

    ``empty``: a diffusers model gets its parameters on the meta device (no memory, no random initialisation), for
    a loader that assigns every one of them from a file; other classes are built as usual.
    """
    if "_class_name" in config:
        cls = diffusers_class(config["_class_name"])
        try:
            if empty:
                from accelerate import init_empty_weights

                with init_empty_weights():
                    return cls.from_config(dict(config))
            return cls.from_config(dict(config))
        except Exception as e:  # a damaged or hand-edited config: diffusers' own message, one line
            raise SurgeonError(
                f"cannot build {cls.__name__} from {where}: {brief(e)}",
                "the config is damaged or was written for another model; save the model again",
            ) from e
    if "_surgeon_class" not in config:
        raise SurgeonError(f"{where} has no config saying which model it holds", "save the model again")
    init = config.get("_surgeon_init")
    if init is None:
        raise SurgeonError(f"{where} holds a {config['_surgeon_class']} saved without init arguments", _LOAD_INTO_HINT)
    cls = resolve_class(config["_surgeon_class"], where)
    try:
        if hasattr(cls, "from_config"):
            return cls.from_config(init)
        return built_without_arguments(cls()) if not init else cls(**init)
    except SurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - a constructor may raise anything
        raise SurgeonError(
            f"cannot build {cls.__name__} from {where}: {type(e).__name__}: {brief(e)}", _LOAD_INTO_HINT
        ) from None
