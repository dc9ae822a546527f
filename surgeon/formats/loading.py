"""Turn a model reference into a module: folders, ``file.py:Class``, presets and hub ids.

``load_model(ref)`` tries, in order: an existing folder (surgeon save or export, diffusers pipeline, diffusers
model), a single ``.safetensors`` file (:func:`load_safetensors_file`), ``path/to/file.py:Class``, a preset name,
a hub id.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from torch import nn

from surgeon.errors import SurgeonError, brief, check_arg
from surgeon.formats import load
from surgeon.io.atomic import missing_target_error
from surgeon.io.classes import built_without_arguments, diffusers_class, import_file, read_json, trusting_code
from surgeon.io.container import readable_path
from surgeon.io.folders import inside
from surgeon.models import presets

# the only weights a model folder may hold; loading never unpickles
_WEIGHTS = "diffusion_pytorch_model*.safetensors*"
_HUB_PATTERNS = [
    "model_index.json",
    "config.json",
    "model.safetensors",
    _WEIGHTS,
    *(f"{sub}/{name}" for sub in ("unet", "transformer") for name in ("config.json", "model.safetensors", _WEIGHTS)),
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_PIPELINE_PARTS = ("unet", "transformer")


def _load_folder(folder: Path) -> nn.Module:
    if (folder / "model.safetensors").is_file():
        return load(folder)
    if (folder / "model" / "model.safetensors").is_file() and not (folder / "config.json").exists():
        return load(folder / "model")  # a run folder of surgeon sparsify/finetune stands for the model it saved
    if (folder / "model_index.json").is_file():
        index = read_json(inside(folder, folder / "model_index.json"))
        for part in _PIPELINE_PARTS:
            if part in index and (folder / part).is_dir():
                return _load_folder(folder / part)
        raise SurgeonError(f"pipeline {folder} has no unet or transformer folder", "give the model's own folder")
    if (folder / "config.json").is_file():
        config = read_json(inside(folder, folder / "config.json"))
        if "_class_name" not in config:
            raise SurgeonError(f"{folder / 'config.json'} has no _class_name", "is this a diffusers model folder?")
        return load_diffusers_folder(folder, diffusers_class(config["_class_name"]))
    raise SurgeonError(
        f"cannot load model {folder}: the folder has no config.json, model_index.json or model.safetensors",
        "give a diffusers model or pipeline folder, or a folder written by surgeon",
    )


def load_diffusers_folder(folder: Path, cls: type[nn.Module]) -> nn.Module:
    """A diffusers model from ``folder``, read from safetensors only: a folder with only pickled weights (``.bin``,
    ``.ckpt``) is refused before diffusers looks at it, so nothing is ever unpickled."""
    if not any(folder.glob("*.safetensors")):
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        found = f" (it has {', '.join(others)}: pickles, which surgeon never loads)" if others else ""
        raise SurgeonError(
            f"{folder} has no safetensors weights{found}",
            "convert the weights to safetensors, e.g. save_pretrained(..., safe_serialization=True)",
        )
    for file in folder.iterdir():  # what diffusers reads: its config and weights, never through a link out
        if file.suffix == ".json" or ".safetensors" in file.name:
            inside(folder, file)
    try:
        model = cls.from_pretrained(folder, use_safetensors=True)
    except Exception as e:
        raise SurgeonError(
            f"cannot load {cls.__name__} from {folder}: {brief(e)}",
            "the folder needs a config.json and safetensors weights that match it",
        ) from e
    # tensors the weights file lacks are left on the meta device by diffusers: name them now, not at first use
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise SurgeonError(
            f"{folder} has no weights for {len(empty)} tensors of {cls.__name__}: {shown}",
            "the weights file is incomplete or belongs to another model than config.json describes",
        )
    return model


def _load_file_class(ref: str, file: str, name: str) -> nn.Module:
    if not Path(file).is_file():
        raise SurgeonError(f"cannot load model {ref}: {file} does not exist", "give an existing path/to/file.py:Class")
    module = import_file(Path(file))
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = "has no class" if cls is None else "defines, but not as a torch.nn.Module class,"
        raise SurgeonError(
            f"cannot load model {ref}: {file} {what} {name}", "name an nn.Module class defined in that file"
        )
    try:
        return built_without_arguments(cls())
    except Exception as e:  # noqa: BLE001 - the user's constructor may raise anything
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
    except Exception as e:  # noqa: BLE001 - the hub client raises many types
        raise SurgeonError(f"cannot load model {ref} from the Hugging Face Hub: {brief(e)}", hint) from None
    return _load_folder(Path(local))


def load_safetensors_file(
    path: str | os.PathLike, architecture: str | os.PathLike | None = None, trust_code: bool = False
) -> nn.Module:
    """A model from one bare ``.safetensors`` file (never a pickle).

    Its architecture comes from, in order: the file's own surgeon metadata (``surgeon export --out x.safetensors``
    in any format, or a saved model's ``model.safetensors``), a ``config.json`` beside it (the diffusers layout,
    ``unet/diffusion_pytorch_model.safetensors``), or ``architecture`` (any reference :func:`load_model` takes,
    whose weights are then replaced by the file's). ``trust_code`` as in :func:`load_model`: a recorded class
    outside diffusers and surgeon's own models needs it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SurgeonError(f"{path} does not exist", "give an existing .safetensors file")
    name = readable_path(path)
    try:
        with safe_open(name, "pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise SurgeonError(
            f"{path} is not a safetensors file ({brief(e)})",
            "surgeon reads weights from .safetensors only; convert the checkpoint, or give its diffusers folder",
        ) from e
    if header.get("format") == "surgeon":
        return load(path, trust_code=trust_code)
    if (path.parent / "config.json").is_file():
        config = read_json(inside(path.parent, path.parent / "config.json"))
        if "_class_name" not in config:
            raise SurgeonError(f"{path.parent / 'config.json'} has no _class_name", "is this a diffusers model folder?")
        model = diffusers_class(config["_class_name"]).from_config(config)
    elif architecture is not None:
        from surgeon.masking.surgery import remove, sites

        model = load_model(architecture, trust_code=trust_code)
        if sites(model):
            remove(model)  # the file holds plain tensors; they replace the masked model's weights
    else:
        raise SurgeonError(
            f"cannot tell which model {path} holds: it has no surgeon metadata and no config.json beside it",
            "name the architecture: pass MODEL (a preset, folder or file.py:Class of the same model), or put its "
            "diffusers config.json next to the file",
        )
    state = load_file(str(path))
    expected = model.state_dict()
    for name in [*expected, *state]:
        if name not in state or name not in expected or tuple(state[name].shape) != tuple(expected[name].shape):
            have = list(state[name].shape) if name in state else "nothing"
            want = list(expected[name].shape) if name in expected else "nothing"
            raise SurgeonError(
                f"{path} does not fit {type(model).__name__}: {name} is {have} in the file, {want} in the model",
                "give the architecture the file was saved from",
            )
    model.load_state_dict(state)
    return model


def load_model(ref: str | os.PathLike, trust_code: bool = False) -> nn.Module:
    """A model from a folder, a surgeon ``.safetensors`` file, ``path/to/file.py:Class`` (built with no arguments),
    a preset or a hub id.

    ``trust_code``: a saved folder whose config names a Python file or a module other than diffusers and surgeon's
    own models is loaded only with ``trust_code=True`` (loading imports, i.e. runs, that code). A
    ``file.py:Class`` given here as ``ref`` is your own explicit choice and needs no opt-in.
    """
    check_arg(ref, (str, os.PathLike), "ref", "a model reference (a folder, file.py:Class, preset or hub id)")
    with trusting_code(trust_code):
        return _load_ref(str(ref))


def looks_like_path(ref: str) -> bool:
    """A reference meant as a local path: it starts with ``.``, ``/`` or ``~``, or its parent folder exists here
    (``runs/nothere`` when ``runs/`` exists). A hub id (``org/name``) has no such local parent."""
    if ref.startswith((".", "/", "~")) or ref.endswith(".safetensors") or (os.sep != "/" and os.sep in ref):
        return True
    parent = Path(ref).expanduser().parent
    return "/" in ref and parent != Path(".") and parent.is_dir()


def missing_path(ref: str) -> SurgeonError:
    """ "no such folder", with the nearest existing parent and, when one is close, the name the user likely meant."""
    path = Path(ref).expanduser()
    interrupted = missing_target_error(path, "the model")
    if interrupted is not None:
        return interrupted
    parent = next((p for p in path.absolute().parents if p.is_dir()), Path("/"))
    what = "file" if path.suffix else "folder"
    siblings = [p.name for p in parent.iterdir()] if parent == path.absolute().parent else []
    near = difflib.get_close_matches(path.name, siblings, n=1)
    hint = (
        f"did you mean {path.parent / near[0]}?" if near else f"check the path; the nearest existing folder is {parent}"
    )
    return SurgeonError(f"no such {what}: {ref}", hint)


def _load_ref(ref: str) -> nn.Module:
    path = Path(ref).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.suffix == ".safetensors" and path.is_file():
        return load_safetensors_file(path)
    file, sep, name = ref.rpartition(":")
    if sep and file.endswith(".py"):
        return _load_file_class(ref, file, name)
    if ref.endswith(".py"):
        raise SurgeonError(f"cannot load model {ref}: name the class", f"write {ref}:ClassName")
    if ref in presets.PRESETS:
        return presets.build(ref)
    if looks_like_path(ref) and not path.exists():
        raise missing_path(ref)
    if _HUB_ID.match(ref) and not path.exists():
        return _load_hub(ref)
    raise SurgeonError(
        f"cannot load model {ref}: not a folder, file.py:Class, preset or hub id",
        f"presets: {', '.join(presets.PRESETS)}; or a diffusers model/pipeline folder, or path/to/file.py:Class",
    )


def find_autoencoder(ref: str) -> nn.Module | None:
    """The frozen autoencoder of a latent-diffusion pipeline folder (vae/ or vqvae/), if any."""
    root = Path(ref)
    if not (root / "model_index.json").is_file():
        return None
    for sub in ("vqvae", "vae"):
        cfg = root / sub / "config.json"
        if cfg.is_file():
            return load_diffusers_folder(
                root / sub, diffusers_class(read_json(inside(root, cfg)).get("_class_name", "AutoencoderKL"))
            )
    return None
