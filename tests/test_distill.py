"""SparseDM's objective: λ1·‖F_s − F_t‖² + λ2·‖ε − F_s‖² on the same (x_t, t), teacher frozen in eval mode."""

from __future__ import annotations

import copy

import torch

import surgeon
from surgeon.models.presets import build
from surgeon.tasks.images import ImageTask
from surgeon.training.objectives import DistillLoss, EpsilonLoss


def _setup():
    student = build("tiny-unet", seed=0)
    teacher = copy.deepcopy(student)
    surgeon.inject(student, surgeon.plan(student, nm="2:4"))
    task = ImageTask(student, data="unused")
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    inputs, eps, weight = task.noisy_batch(images, torch.Generator().manual_seed(2))
    return student, teacher, task, inputs, eps, weight


def test_distill_loss_is_the_weighted_sum_of_its_two_terms():
    student, teacher, task, inputs, eps, weight = _setup()
    with torch.no_grad():
        s = task.predict(student, inputs)
        t = task.predict(teacher.eval(), inputs)
    expected = 0.3 * ((s - t) ** 2).mean() + 0.7 * ((s - eps) ** 2).mean()
    got = DistillLoss(task, teacher, lambda_1=0.3, lambda_2=0.7)(student, inputs, eps, weight)
    torch.testing.assert_close(got, expected)
    # λ1 = 0 leaves the plain ε-objective; an N:M student differs from its dense teacher, so λ1 matters
    torch.testing.assert_close(
        DistillLoss(task, teacher, 0.0, 1.0)(student, inputs, eps, weight),
        EpsilonLoss(task)(student, inputs, eps, weight),
    )
    assert float(((s - t) ** 2).mean()) > 0


def test_teacher_is_frozen_and_student_gets_gradients():
    student, teacher, task, inputs, eps, weight = _setup()
    teacher.train()
    loss = DistillLoss(task, teacher)(student, inputs, eps, weight)
    loss.backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
