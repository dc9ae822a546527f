"""Training objectives. The plain DDPM ε-loss, and SparseDM's distillation from a frozen teacher (eq. 11):

    L = λ1·‖F_student(x_t, t) − F_teacher(x_t, t)‖² + λ2·‖ε − F_student(x_t, t)‖²

The teacher runs in eval mode without gradients on the very same inputs (same x_t and t). Composes with any
algorithm. The loop drives an objective through these calls::

    objective(model, inputs, target, weight) -> loss
    objective.to(device)                                  once, before training
    objective.state_dict() / load_state_dict(state, model)   into and out of checkpoints (resume)
    objective.begin_stage(stage, model, out_dir, acc)     at a progressive N:M stage switch
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.io.atomic import atomic_path
from surgeon.io.classes import copy_model
from surgeon.tasks.base import EpsilonLoss, Task
from surgeon.training.teacher import content_digest, freeze


class DistillLoss(EpsilonLoss):
    """``previous=True`` (recipe ``teacher: previous``): at each stage switch the teacher becomes the student as the
    previous stage left it; the snapshot goes to the run's checkpoints/ folder so a resumed run finds it again."""

    def __init__(
        self, task: Task, teacher: nn.Module, lambda_1: float = 1.0, lambda_2: float = 1.0, previous: bool = False
    ):
        super().__init__(task)
        self.teacher = freeze(teacher)
        self.lambda_1, self.lambda_2 = lambda_1, lambda_2
        self.previous = previous
        self.stage_teacher: dict | None = None  # the snapshot file of the previous stage's model, when one is in use
        self.device = None

    def __call__(self, model, inputs, target, weight):
        pred = self.task.predict(model, inputs)
        with torch.no_grad():
            teacher_pred = self.task.predict(self.teacher, inputs)
        return self.lambda_1 * self.task.mse(pred, teacher_pred, weight) + self.lambda_2 * self.task.mse(
            pred, target, weight
        )

    def to(self, device) -> DistillLoss:
        self.device = device
        self.teacher.to(device)
        return self

    def state_dict(self) -> dict:
        return {"stage_teacher": self.stage_teacher}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        if state.get("stage_teacher"):
            self._use_snapshot(state["stage_teacher"], model)

    def begin_stage(self, stage: int, model: nn.Module, out_dir: Path, accelerator) -> None:
        if not self.previous:
            return
        # the student as the previous stage left it (its weights and its pattern): frozen, it teaches this stage
        teacher = freeze(copy_model(model))
        nm = _pattern(model)
        path = Path(out_dir) / "checkpoints" / f"teacher-stage-{stage + 1}.safetensors"
        record = {"path": str(path.resolve()), "digest": content_digest(teacher), "nm": nm}
        if accelerator.is_main_process:  # resume reads it back; the run itself keeps the copy in memory
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().to("cpu").contiguous() for k, v in teacher.state_dict().items()}
            with atomic_path(path) as tmp:
                save_file(state, str(tmp), metadata={"nm": nm})
        accelerator.wait_for_everyone()
        self.teacher, self.stage_teacher = teacher, record

    def _use_snapshot(self, record: dict, model: nn.Module) -> None:
        """Rebuild a previous-stage teacher from its snapshot file: the student's architecture, the file's weights."""
        from surgeon.algorithms.nm_ste import set_pattern
        from surgeon.masking.surgery import sites

        path = Path(record["path"])
        if not path.is_file():
            raise SurgeonError(f"the previous stage's teacher {path} is missing", "resume from the run's own folder")
        teacher = copy_model(model)
        teacher.load_state_dict(load_file(str(path)))
        n, m = (int(x) for x in record["nm"].split(":"))
        for site in sites(teacher).values():
            if site.is_nm:
                set_pattern(site, n, m)
        freeze(teacher)
        if content_digest(teacher) != record["digest"]:
            raise SurgeonError(
                f"the previous stage's teacher {path} has changed since it was written",
                "resume from an untouched run folder",
            )
        self.teacher, self.stage_teacher = teacher.to(self.device) if self.device is not None else teacher, record


def _pattern(model: nn.Module) -> str:
    """The N:M pattern the model's converted layers use now (the tightest, when some layers stay dense)."""
    from surgeon.masking.surgery import sites

    nm = [(s.parametrization.n, s.parametrization.m) for s in sites(model).values() if s.is_nm]
    n, m = min(nm, key=lambda p: p[0] / p[1]) if nm else (1, 1)
    return f"{n}:{m}"
