"""The two players' optimiser: SGD with momentum inside LARS, and the warmup-cosine learning rate.

The released runs train both the encoder side and the masker with LARS (You et al. 2017) on SGD,
momentum 0.9, biases and norm parameters excluded from LARS and weight decay, a 10-epoch linear
warmup and a cosine decay (README: "Recipes"). torch has no LARS, so it is written out here.
README: "Reading guide".
"""
import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum, each weight tensor's step scaled by LARS's trust ratio (You et al. 2017).

    local rate = η·‖w‖ / (‖g‖ + wd·‖w‖). clip=True (pretraining, η = 0.02): the local rate never
    exceeds the global one. Groups with lars=False (biases, norm parameters) get plain SGD and, by
    their group, no decay.
    """

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
                    if group["clip"]:                         # min(trust, lr) / lr, on the device: no host sync
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    d.mul_(torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust)))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def param_groups(module, lr, weight_decay, **extra):
    """Weights get decay and LARS; biases and norm parameters (1-D tensors) get neither."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], lr=lr, base_lr=lr, weight_decay=weight_decay, **extra),
            dict(params=[p for p in params if p.ndim <= 1], lr=lr, base_lr=lr, weight_decay=0.0, lars=False, **extra)]


def make_optimizer(groups, kind, lr):
    """LARS (kind "lars") or plain SGD, momentum 0.9, over the non-empty parameter groups."""
    groups = [g for g in groups if g["params"]]
    if kind == "lars":
        return LARS(groups, lr=lr, momentum=0.9)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def learning_rate(step, base_lr, warmup_steps, total_steps, start_lr=0.003):
    """Linear warmup from start_lr to base_lr, then cosine to 0; per step (the released code: per epoch)."""
    start_lr = min(start_lr, base_lr)
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rates(optimizer, step, warmup, total):
    """Every group's rate at this step, from its own base_lr; groups marked fixed_lr keep theirs."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr"):
            group["lr"] = learning_rate(step, group["base_lr"], warmup, total)
