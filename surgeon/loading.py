"""Turn a model reference into a module: folders, ``file.py:Class``, presets and hub ids.

``load_model(ref)`` tries, in order: an existing folder (surgeon save, diffusers pipeline, diffusers model),
``path/to/file.py:Class``, a preset name, a hub id. The class helpers below are also how :mod:`surgeon.io`
records a model's class and finds it again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from torch import nn

from . import presets
from .errors import SurgeonError, brief

# the only weights a model folder may hold; loading never unpickles
_WEIGHTS = "diffusion_pytorch_model*.safetensors*"
_HUB_PATTERNS = [
    "model_index.json", "config.json", "model.safetensors", _WEIGHTS,
    *(f"{sub}/{name}" for sub in ("unet", "transformer") for name in ("config.json", "model.safetensors", _WEIGHTS)),
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_PIPELINE_PARTS = ("unet", "transformer")


def diffusers_class(name: str) -> type[nn.Module]:
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise SurgeonError(f"unknown diffusers model class {name!r}", f"diffusers {diffusers.__version__} has no such model")
    return cls


def is_diffusers_class(cls: type) -> bool:
    """True when ``cls`` is diffusers' own class, so ``_class_name`` alone finds it again (not a user subclass)."""
    if not cls.__module__.startswith("diffusers."):
        return False
    import diffusers

    return getattr(diffusers, cls.__name__, None) is cls


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
    module.__surgeon_file__ = str(path)  # lets class_path() record the file, as the module name is made up
    sys.modules[name] = module  # dataclasses and pickling-free introspection look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise SurgeonError(f"cannot import {path}: {type(e).__name__}: {brief(e)}", "fix the error in that file") from None
    return module


def class_path(cls: type) -> str:
    """``module:QualName``, or ``/abs/file.py:QualName`` for classes from files imported by path or run as a script."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__surgeon_file__", None)
    if file is None and cls.__module__ == "__main__":
        file = getattr(module, "__file__", None)
    where = str(Path(file).resolve()) if file else cls.__module__
    return f"{where}:{cls.__qualname__}"


def resolve_class(spec: str) -> type:
    """The inverse of :func:`class_path`."""
    where, _, qualname = str(spec).rpartition(":")
    hint = "build the model yourself and call surgeon.load_into(model, folder)"
    if not where or not qualname:
        raise SurgeonError(f"malformed class path {spec!r}", hint)
    try:
        obj = import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except SurgeonError:
        raise
    except (ImportError, AttributeError) as e:
        raise SurgeonError(f"cannot find class {spec}: {brief(e)}", hint) from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise SurgeonError(f"{spec} is not a torch.nn.Module class", hint)
    return obj


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeonError(f"cannot read {path}: {brief(e)}", "the file is damaged or not JSON") from None
    if not isinstance(data, dict):
        raise SurgeonError(f"{path} does not hold a JSON object", "the file is damaged")
    return data


def _load_folder(folder: Path) -> nn.Module:
    if (folder / "model.safetensors").is_file():
        from .io import load  # io imports the class helpers above, so it is imported here, not at the top

        return load(folder)
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        for part in _PIPELINE_PARTS:
            if part in index and (folder / part).is_dir():
                return _load_folder(folder / part)
        raise SurgeonError(f"pipeline {folder} has no unet or transformer folder", "give the model's own folder")
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        if "_class_name" not in config:
            raise SurgeonError(f"{folder / 'config.json'} has no _class_name", "is this a diffusers model folder?")
        cls = diffusers_class(config["_class_name"])
        try:
            return cls.from_pretrained(folder, use_safetensors=True)
        except Exception as e:
            raise SurgeonError(f"cannot load {cls.__name__} from {folder}: {brief(e)}", "the folder needs safetensors weights") from None
    raise SurgeonError(
        f"cannot load model {folder}: the folder has no config.json, model_index.json or model.safetensors",
        "give a diffusers model or pipeline folder, or a folder written by surgeon",
    )


def _load_file_class(ref: str, file: str, name: str) -> nn.Module:
    if not Path(file).is_file():
        raise SurgeonError(f"cannot load model {ref}: {file} does not exist", "give an existing path/to/file.py:Class")
    module = import_file(Path(file))
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = "has no class" if cls is None else "defines, but not as a torch.nn.Module class,"
        raise SurgeonError(f"cannot load model {ref}: {file} {what} {name}", "name an nn.Module class defined in that file")
    try:
        model = cls()
        # built with no arguments, so save() can record "no init arguments" and load() can build it again
        model._surgeon_init = {}
        return model
    except Exception as e:
        raise SurgeonError(
            f"cannot construct {name}() from {file}: {type(e).__name__}: {brief(e)}",
            "the class must build with no arguments; otherwise build it in Python and use surgeon's API",
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _load_hub(ref: str) -> nn.Module:
    hint = "download it where the hub is reachable and pass its local folder, or use a preset"
    if _offline():
        raise SurgeonError(f"cannot load model {ref}: the Hugging Face Hub is offline (HF_HUB_OFFLINE)", hint)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(ref, allow_patterns=_HUB_PATTERNS)
    except Exception as e:
        raise SurgeonError(f"cannot load model {ref} from the Hugging Face Hub: {brief(e)}", hint) from None
    return _load_folder(Path(local))


def load_model(ref: str | os.PathLike) -> nn.Module:
    """A model from a folder, ``path/to/file.py:Class`` (built with no arguments), a preset or a hub id."""
    ref = str(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return _load_folder(path)
    file, sep, name = ref.rpartition(":")
    if sep and file.endswith(".py"):
        return _load_file_class(ref, file, name)
    if ref.endswith(".py"):
        raise SurgeonError(f"cannot load model {ref}: name the class", f"write {ref}:ClassName")
    if ref in presets.PRESETS:
        return presets.build(ref)
    if _HUB_ID.match(ref) and not path.exists():
        return _load_hub(ref)
    raise SurgeonError(
        f"cannot load model {ref}: not a folder, file.py:Class, preset or hub id",
        f"presets: {', '.join(presets.PRESETS)}; or a diffusers model/pipeline folder, or path/to/file.py:Class",
    )
