"""Tests of optim.py: LARS, the warmup-cosine learning rate, and the optimisers' groups (rates, weight decay)
as build_optimizers makes them for ADIOS (how train.py applies them: test_train.py)."""
import pytest
import torch
import torch.nn as nn

import optim
from helpers import opt_args, tiny_adios


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


class LoopLARS(torch.optim.Optimizer):
    """The reference: LARS as optim.py wrote it before its multi-tensor form, one weight at a time."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True,
                                      clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = p.norm(), p.grad.norm()
                    trust = group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm)
                    if group["clip"]:
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    d.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


@pytest.mark.parametrize("clip", [True, False])
def test_multi_tensor_lars_matches_the_loop_float64(clip):
    # Weights (decay and LARS) and 1-D tensors (neither), a base rate ≠ 1 and a per-step rate, gradients of
    # very different sizes (some local rates clipped, some not), a zero weight (trust 1), a tensor without a
    # gradient at one step (skipped, its momentum untouched), momentum over five steps.
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    shapes = [(6, 5), (4, 3, 3, 3), (7,), (5, 5), (3,)]
    init = [torch.randn(s, generator=g, **f64) for s in shapes]
    init[3].zero_()                                           # ‖w‖ = 0: LARS leaves the step alone
    sides = []
    for kind in (optim.LARS, LoopLARS):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [dict(params=[params[0], params[1], params[3]], lr=0.37, weight_decay=3e-2),
                  dict(params=[params[2], params[4]], lr=0.37, weight_decay=0.0, lars=False)]
        sides.append((params, kind(groups, lr=0.37, momentum=0.9, eta=0.02, clip=clip)))
    for step in range(5):
        grads = [torch.randn(s, generator=g, **f64) * 10.0 ** (3 * (i % 3) - 3) for i, s in enumerate(shapes)]
        for params, opt in sides:
            for i, (p, grad) in enumerate(zip(params, grads)):
                p.grad = None if (step == 2 and i == 1) else grad.clone()
            for group in opt.param_groups:
                group["lr"] = 0.37 * (1 - step / 10)
            opt.step()
    (ours, opt), (ref, ref_opt) = sides
    for i, (p, q) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-14, atol=1e-15, msg=f"tensor {i}")
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   rtol=1e-14, atol=1e-15, msg=f"momentum {i}")
        assert not torch.equal(p.detach(), init[i])          # every tensor moved


def groups_of(opt):
    """{id(parameter): its param group} over an optimiser."""
    return {id(p): g for g in opt.param_groups for p in g["params"]}


# ---- wiring 8: SimSiam's predictor keeps its rate ----------------------------------------------------------

@pytest.mark.parametrize("method", ["simsiam", "byol"])
def test_simsiam_predictor_keeps_its_rate_from_step_0(method):
    # Ours: SimSiam's predictor at the base rate at every step, step 0 included (the released runs had it
    # at the warmup's start rate for their first epoch); everything else on warmup-cosine from its own
    # base rate, BYOL's predictor too.
    model = tiny_adios(method, num_classes=4)
    args = opt_args(method)
    opt_enc, _ = optim.build_optimizers(model, args)
    predictor = {id(p) for p in model.predictor.parameters()}
    warmup, total = 10, 50
    for step in (0, 3, 10, 30, 50):
        optim.set_learning_rates(opt_enc, step, warmup, total)
        for group in opt_enc.param_groups:
            on_predictor = {id(p) for p in group["params"]} <= predictor
            scheduled = optim.learning_rate(step, group["base_lr"], warmup, total)
            assert group["lr"] == (args.lr if on_predictor and method == "simsiam" else scheduled), (step, group)
    optim.set_learning_rates(opt_enc, 0, warmup, total)
    rates = {g["lr"] for g in opt_enc.param_groups}
    assert (args.lr in rates) == (method == "simsiam") and 0.003 in rates


# ---- wiring 9: weight decay: which groups carry it, and that it is applied ---------------------------------

def test_weight_decay_reaches_the_weights_and_only_them():
    # As the released runs: both players' optimisers decay their weights (dim ≥ 2) by --weight_decay,
    # never biases or norm parameters (dim 1, which also skip LARS), and the online probe not at all.
    model = tiny_adios("simsiam", num_classes=4)
    args = opt_args("simsiam", optimizer="lars", weight_decay=1e-2)
    opt_enc, opt_mask = optim.build_optimizers(model, args)
    groups = {**groups_of(opt_enc), **groups_of(opt_mask)}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(groups) == len(trained) == sum(len(g["params"]) for o in (opt_enc, opt_mask) for g in o.param_groups)
    probe = {id(p) for p in model.classifier.parameters()}
    expected = {}
    for name, p in trained:
        decays = p.ndim > 1 and id(p) not in probe
        expected[name] = decays
        g = groups[id(p)]
        assert g["weight_decay"] == (args.weight_decay if decays else 0.0), name
        assert g["lars"] == (p.ndim > 1), name
    assert any(n.startswith("masker.") and d for n, d in expected.items())          # the masker's too
    assert any(n.startswith("masker.") and not d for n, d in expected.items())      # its GroupNorms not
    # Applied: with zero gradients one LARS step moves exactly the decayed tensors, by lr·wd·w.
    before = {n: p.detach().clone() for n, p in trained}
    for _, p in trained:
        p.grad = torch.zeros_like(p)
    opt_enc.step()
    opt_mask.step()
    for name, p in trained:
        lr = groups[id(p)]["lr"]
        torch.testing.assert_close(p.detach(), before[name] * (1 - lr * args.weight_decay * expected[name]),
                                   rtol=0, atol=1e-15, msg=name)


# ---- wiring 11: LARS clips at a base rate other than 1 -----------------------------------------------------

def test_lars_clips_the_local_rate_at_any_base_rate():
    # local rate = η‖w‖ / (‖g‖ + wd‖w‖), never above the base rate lr:
    # the step is min(local, lr)·(g + wd·w).
    lr, wd, eta = 0.1, 0.01, 0.02
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1.0):                                  # local rate ≫ lr (clipped to lr); ≪ lr (kept)
        w = nn.Parameter(torch.randn(4, 5, generator=g, dtype=torch.float64))
        opt = optim.LARS([dict(params=[w], lr=lr, weight_decay=wd)], lr=lr, momentum=0.0, eta=eta)
        w.grad = scale * torch.randn(4, 5, generator=g, dtype=torch.float64)
        w0 = w.detach().clone()
        local = eta * w0.norm() / (w.grad.norm() + wd * w0.norm())
        assert (local > 2 * lr) if scale < 1 else (local < lr / 2)
        opt.step()
        torch.testing.assert_close(w.detach(), w0 - min(local, lr) * (w.grad + wd * w0), rtol=0, atol=1e-14)
