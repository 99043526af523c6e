"""Tests of optim.py: LARS and the warmup-cosine learning rate (how train.py applies them: test_train.py)."""
import pytest
import torch

import optim


def test_lars_clips_the_local_rate():
    w = torch.nn.Parameter(torch.ones(4, 4))
    opt = optim.LARS([dict(params=[w], lr=1.0, weight_decay=0.0)], lr=1.0, momentum=0.0)
    w.grad = torch.full((4, 4), 0.001)                       # trust η·‖w‖/‖g‖ = 20 > 1: clipped to lr
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 1 - 0.001))
    w.grad = torch.full((4, 4), 1.0)                          # trust 0.02: the step shrinks 50×
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(before - w.detach(), 0.02 * before)     # η·‖w‖/‖g‖ · g, g = 1


def test_learning_rate_schedule():
    lr = [optim.learning_rate(s, 1.0, 10, 110) for s in range(111)]
    assert lr[0] == pytest.approx(0.003) and lr[10] == pytest.approx(1.0) and lr[110] == pytest.approx(0.0)
    assert all(a <= b for a, b in zip(lr[:10], lr[1:11])) and all(a >= b for a, b in zip(lr[10:], lr[11:]))
