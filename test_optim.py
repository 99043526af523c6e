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


def test_lars_without_clipping_float64():
    # The released linear probe's step: LARS with η = 1e-3 and no clipping around SGD (lr 0.1, momentum
    # 0.9, no decay); the weight steps lr·η·‖w‖/‖g‖·g, the same whatever the gradient's size; the bias
    # (optim.param_groups: 1-D, lars off) takes plain SGD steps.
    lr, eta = 0.1, 1e-3
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 3).double()
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    groups = optim.param_groups(head, lr, weight_decay=0.0)
    assert groups[0]["params"] == [head.weight] and groups[1]["params"] == [head.bias]
    opt = optim.LARS(groups, lr=lr, momentum=0.9, eta=eta, clip=False)
    f64 = dict(generator=g, dtype=torch.float64)
    grads = [(scale * torch.randn(3, 5, **f64), torch.randn(3, **f64)) for scale in (1e-3, 1e+3)]  # (w, b), 2 steps
    # First step, a tiny gradient: the local rate lr·η·‖w‖/‖g‖ exceeds lr, so clipping would change it.
    (gw, gb) = grads[0]
    head.weight.grad, head.bias.grad = gw.clone(), gb.clone()
    opt.step()
    d_w = eta * w0.norm() / gw.norm() * gw                     # the momentum buffer starts as the first step
    assert eta * w0.norm() / gw.norm() > 1.5 * lr
    torch.testing.assert_close(head.weight.detach(), w0 - lr * d_w, rtol=0, atol=1e-15)
    torch.testing.assert_close(head.bias.detach(), b0 - lr * gb, rtol=0, atol=1e-15)
    assert (w0 - head.weight.detach()).norm().item() == pytest.approx(lr * eta * w0.norm().item(), rel=1e-12)
    # Second step, a huge gradient: the weight's step is still lr·η·‖w‖ long (plus momentum).
    w1, b1 = head.weight.detach().clone(), head.bias.detach().clone()
    (gw, gb) = grads[1]
    head.weight.grad, head.bias.grad = gw.clone(), gb.clone()
    opt.step()
    buf_w = 0.9 * d_w + eta * w1.norm() / gw.norm() * gw
    torch.testing.assert_close(head.weight.detach(), w1 - lr * buf_w, rtol=0, atol=1e-13)
    torch.testing.assert_close(head.bias.detach(), b1 - lr * (0.9 * grads[0][1] + gb), rtol=0, atol=1e-13)
