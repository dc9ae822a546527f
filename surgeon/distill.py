"""Training objectives. The plain DDPM ε-loss, and SparseDM's distillation from a frozen dense teacher:

    L = λ1·‖F_student(x_t, t) − F_teacher(x_t, t)‖² + λ2·‖ε − F_student(x_t, t)‖²

The teacher runs in eval mode without gradients on the very same inputs (same x_t and t). Composes with any
algorithm: the loop only calls ``objective(model, inputs, target, weight)``.
"""
from __future__ import annotations

import torch
from torch import nn

from .tasks.base import Task


class EpsilonLoss:
    def __init__(self, task: Task):
        self.task = task

    def __call__(self, model: nn.Module, inputs: dict, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return self.task.mse(self.task.predict(model, inputs), target, weight)


class DistillLoss(EpsilonLoss):
    def __init__(self, task: Task, teacher: nn.Module, lambda_1: float = 1.0, lambda_2: float = 1.0):
        super().__init__(task)
        self.teacher = teacher.eval().requires_grad_(False)
        self.lambda_1, self.lambda_2 = lambda_1, lambda_2

    def __call__(self, model, inputs, target, weight):
        pred = self.task.predict(model, inputs)
        with torch.no_grad():
            teacher_pred = self.task.predict(self.teacher, inputs)
        return self.lambda_1 * self.task.mse(pred, teacher_pred, weight) + self.lambda_2 * self.task.mse(pred, target, weight)
