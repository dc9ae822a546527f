"""The teacher of N:M fine-tuning: loaded from any model reference or one bare .safetensors file, frozen, and
named by content so a resumed run can refuse a different one.

The teacher never joins the student: it is not a submodule, so it is in no optimizer, no checkpoint and no saved
model. Checkpoints record only its reference and :func:`content_digest`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.masking.targets import find_targets


def content_digest(model: nn.Module) -> str:
    """SHA-256 over every state tensor's name, dtype, shape and bytes: equal weights, equal digest."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout, fixed norms) and no gradients, in place."""
    return model.eval().requires_grad_(False)


def load_teacher(
    ref: str | os.PathLike | nn.Module,
    architecture: str | os.PathLike | nn.Module | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """The teacher (not yet frozen: the student may start as a copy). ``ref``: any :func:`surgeon.load_model`
    reference, a single ``.safetensors`` file (its architecture from its metadata, a config.json beside it, or
    ``architecture``), or a module you built. ``trust_code`` as in :func:`surgeon.load_model`."""
    from surgeon.formats.loading import load_model, load_safetensors_file

    if isinstance(ref, nn.Module):
        return ref
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SurgeonError(
                f"teacher {path} is not a .safetensors file",
                "surgeon never loads pickles: give a .safetensors file, or the model's diffusers folder",
            )
        if isinstance(architecture, nn.Module):
            raise SurgeonError(
                "a bare teacher file needs its architecture as a model reference, not a module",
                "load the weights into your module and pass the module as the teacher",
            )
        return load_safetensors_file(path, architecture, trust_code=trust_code)
    return load_model(ref, trust_code=trust_code)


def check_same_targets(student: nn.Module, teacher: nn.Module) -> None:
    """Student and teacher must have the same target tensors (names and shapes); else name the first difference."""
    s, t = find_targets(student), find_targets(teacher)
    for fqn in [*s, *t]:
        a, b = s.get(fqn), t.get(fqn)
        if a is None or b is None or a.shape != b.shape:
            where = lambda x: list(x.shape) if x is not None else "absent"  # noqa: E731
            raise SurgeonError(
                f"MODEL and TEACHER differ at {fqn}: {where(a)} in the student, {where(b)} in the teacher",
                "give a teacher of the same architecture as MODEL, or leave MODEL out to start "
                "from a copy of the teacher",
            )
