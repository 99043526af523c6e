"""The two players' optimisers: SGD with momentum inside LARS, and their warmup-cosine learning rates.

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
        """One step for every group, each a handful of multi-tensor (torch._foreach_*) kernels over all its
        weights rather than a Python loop of kernels per weight; no host sync."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"])     # g + wd·w, per tensor
            if group["lars"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads))
                trust = group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm)    # (number of tensors,)
                if group["clip"]:                             # min(trust, lr) / lr, on the device: no host sync
                    trust = torch.clamp(trust / group["lr"], max=1.0)
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                torch._foreach_mul_(d, list(trust.unbind()))
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if any(buf is None for buf in bufs):              # the first step: the buffer starts as d
                for p, buf, step in zip(params, bufs, d):
                    if buf is None:
                        self.state[p]["momentum_buffer"] = step.clone()
                    else:                                     # (a tensor whose gradient came later)
                        buf.mul_(group["momentum"]).add_(step)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
            else:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


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


# ---- the two players of train.py -----------------------------------------------------------------

def build_optimizers(model, args):
    """(encoder-side optimiser, masker optimiser or None): the two players' own optimisers."""
    net = model.net
    groups = param_groups(net.encoder, args.lr, args.weight_decay) + \
        param_groups(net.projector, args.lr, args.weight_decay)
    if net.predictor is not None:       # SimSiam's predictor keeps its rate (as in SimSiam)
        groups += param_groups(net.predictor, args.lr, args.weight_decay, fixed_lr=args.method == "simsiam")
    if net.classifier is not None:      # the online probe: its own rate, no decay (LARS tames its steps)
        groups += param_groups(net.classifier, args.classifier_lr, 0.0)
    opt_enc = make_optimizer(groups, args.optimizer, args.lr)
    learned = args.mask_type == "adios" and model.masker is not None
    opt_mask = make_optimizer(param_groups(model.masker, args.mask_lr, args.weight_decay), args.optimizer,
                              args.mask_lr) if learned else None
    return opt_enc, opt_mask


def learning_rate_schedules(args, steps_per_epoch):
    """Warmup + cosine per step for each player. The encoder's ends --encoder_early_end epochs before
    the masker's (the released BYOL runs), and stays at 0 after; BYOL's τ follows the masker's length."""
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    return dict(encoder=dict(warmup=warmup, total=(args.epochs - args.encoder_early_end) * steps_per_epoch),
                masker=dict(warmup=warmup, total=total), steps_per_epoch=steps_per_epoch,
                last_step=total if args.max_steps is None else min(total, args.max_steps))
