"""What the training loop does differently when the model is sharded with FSDP2 (``fully_shard``).

Two ways in, one loop: ``accelerate launch --use_fsdp --fsdp_version 2`` on GPUs, where ``Accelerator.prepare``
shards the model; or a caller that sets up the process group and passes a model it sharded with ``fully_shard``
itself (the only way on CPU, where Accelerate never enables FSDP). FSDP2 then synchronizes the gradients itself,
so such a model is never wrapped in DDP. Everything the loop does to weights outside the forward and backward
goes through surgeon.masking.shards.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.masking.shards import local, model_is_sharded


def prepare(acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer):
    """(the module to call, the optimizer to step): Accelerate's DDP or FSDP2 wrapping, or, for a model sharded by
    the caller, the model as it is (FSDP2 reduces its gradients) and the optimizer wrapped alone."""
    if model_is_sharded(model):
        return model, acc.prepare_optimizer(optimizer)
    return acc.prepare(model, optimizer)


def check_supported(model: nn.Module, objective) -> None:
    """Refuse, before the first step, what a sharded model cannot do."""
    if model_is_sharded(model) and getattr(objective, "previous", False):
        raise SurgeonError(
            "a previous-stage teacher (distill.teacher: previous) is a copy of the student, "
            "and FSDP2 cannot copy a sharded model",
            "distil from a fixed teacher (finetune --teacher MODEL), or train with DDP (accelerate launch --multi_gpu)",
        )


def no_sync(acc: Accelerator, model: nn.Module, accumulating: bool):
    """While ``accumulating`` (a micro-batch before the last), the backward keeps its gradients local."""
    if not accumulating:
        return nullcontext()
    if model_is_sharded(model):
        return _fsdp2_no_sync(model)
    return acc.no_sync(model)


@contextmanager
def _fsdp2_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def all_finite(acc: Accelerator, tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite; for shards, on every rank (all ranks must call it)."""
    ok = all(bool(torch.isfinite(local(t)).all()) for t in tensors)
    if not any(t is not local(t) for t in tensors) or acc.num_processes == 1:
        return ok
    bad = torch.tensor([0.0 if ok else 1.0], device=acc.device)
    return float(acc.reduce(bad, reduction="sum")) == 0.0
