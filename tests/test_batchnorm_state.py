"""BatchNorm state as released (CPU, float64, seconds): after every iteration, the weights and the running
statistics of f_θ (and of BYOL's target) equal what the released training_step's sequence of forward passes
leaves (released_loop.py, run on plain torch BatchNorm modules); and the work skipped or done once gives the
same gradients.
README: "BatchNorm state".
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import released_loop
import train
from adios import ADIOS, sparsity_penalty
from batchnorm import SlotBatchNormMixin
from helpers import tiny_encoder
from losses import byol_loss
from masker import Masker

B, IMG, N = 6, 16, 3


def build(method, num_masks=N, single_mask=False, alpha_entropy=0.0):
    torch.manual_seed(0)
    masker = Masker(num_masks, IMG, base_channels=8) if num_masks else None
    terms = dict(simsiam_masked_targets=True, simsiam_unmasked=True, simsiam_both_masked=True) \
        if method == "simsiam" else {}
    return ADIOS(tiny_encoder(), 16, masker, method=method, alpha=0.5, single_mask=single_mask, proj_hidden_dim=32,
                 proj_output_dim=8, pred_hidden_dim=12, num_classes=4, alpha_entropy=alpha_entropy, **terms).double()


def plain_copy(model):
    """A copy of model whose BatchNorm layers are torch's own nn.BatchNorm1d/2d again (same state)."""
    copied = copy.deepcopy(model)

    def unconvert(module):
        for name, child in module.named_children():
            if isinstance(child, SlotBatchNormMixin):
                kind = nn.BatchNorm2d if isinstance(child, nn.BatchNorm2d) else nn.BatchNorm1d
                plain = kind(child.num_features, child.eps, child.momentum, child.affine).double()
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
            else:
                unconvert(child)

    for module in (copied.net, copied.target):
        if module is not None:
            unconvert(module)
    assert not any(isinstance(m, SlotBatchNormMixin) for m in copied.modules())
    return copied


# ---- the released training_step: released_loop.py, on plain BatchNorm modules ----------------------------

def released_iteration(model, x_a, x_b, labels, opt_enc, opt_mask, target_pick="masker"):
    """One released iteration (released_loop.iteration: encoder step with the probe's pass, masker step),
    then BYOL's EMA. target_pick="encoder": the masker step's BYOL target encodes the encoder step's ADIOS-s
    slot, the one departure of ours (README "BatchNorm state")."""
    released_loop.iteration(model, x_a, x_b, labels, opt_enc, opt_mask, target_pick)
    if model.method == "byol":
        model.momentum_update(0.9)


def our_iteration(model, x_a, x_b, labels, opt_enc, opt_mask):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, contextlib.nullcontext)
    if model.method == "byol":
        model.momentum_update(0.9)


def optimisers(model):
    opt_mask = torch.optim.SGD(model.masker.parameters(), lr=0.1) if model.has_masker_step else None
    return torch.optim.SGD(model.net.parameters(), lr=0.1, momentum=0.9), opt_mask


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x_a, x_b = torch.randn(2, B, 3, IMG, IMG, generator=g, dtype=torch.float64)          # 2 × (B, 3, H, W)
    return x_a, x_b * 1.5 + 0.3, torch.tensor([0, 1, 2, 3, -1, 1])


def buffers(model):
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


CASES = [(m, n, s, 0.0) for m in ("simclr", "byol", "simsiam") for n, s in ((N, False), (N, True), (0, False))]
CASES += [("simclr", N, False, 0.3), ("simsiam", N, False, 0.3), ("simsiam", N, True, 0.3)]     # with α₂


@pytest.mark.parametrize("method, num_masks, single, alpha_entropy", CASES,
                         ids=[f"{m}-{'base' if not n else 'adios-s' if s else 'adios'}{'-α₂' if e else ''}"
                              for m, n, s, e in CASES])
def test_batchnorm_state_equals_the_released_sequence(method, num_masks, single, alpha_entropy):
    ours = build(method, num_masks, single, alpha_entropy)
    released = plain_copy(ours)
    opts, ref_opts = optimisers(ours), optimisers(released)
    assert len(buffers(ours)) == len(buffers(released)) > 0
    for it in range(2):
        x_a, x_b, labels = batch(it)
        torch.manual_seed(10 + it)                            # ADIOS-s: the same slot draws on both sides
        our_iteration(ours, x_a, x_b, labels, *opts)
        torch.manual_seed(10 + it)
        released_iteration(released, x_a, x_b, labels, *ref_opts, target_pick="encoder")
        mine, theirs = ours.state_dict(), released.state_dict()
        assert list(mine) == list(theirs)
        for k in mine:                                        # weights and every BatchNorm buffer
            torch.testing.assert_close(mine[k], theirs[k], msg=f"iteration {it}: {k}")
    moved = [k for k, v in buffers(ours).items() if "running_mean" in k and v.abs().sum() > 0]
    assert moved and (method != "byol" or any(k.startswith("target") for k in moved))


def test_the_masked_target_pass_of_adios_s_is_the_one_departure():
    """ADIOS-s BYOL: the released masker step encodes its own fresh slot draw through the target; ours reuses
    the encoder step's draw's statistics. Only the target's buffers differ."""
    ours = build("byol", N, True)
    released = plain_copy(ours)
    opts, ref_opts = optimisers(ours), optimisers(released)
    x_a, x_b, labels = batch(0)
    torch.manual_seed(10)
    our_iteration(ours, x_a, x_b, labels, *opts)
    torch.manual_seed(10)
    released_iteration(released, x_a, x_b, labels, *ref_opts)
    mine, theirs = ours.state_dict(), released.state_dict()
    differ = [k for k in mine if not torch.allclose(mine[k].double(), theirs[k].double())]
    assert differ and all(k.startswith("target.") and "running" in k for k in differ)


# ---- work done once: the same gradients as the straightforward version (float64) ----------------------

def grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def test_simsiam_clean_views_in_one_call_give_the_two_calls_gradients():
    model = build("simsiam")
    x_a, x_b, labels = batch(0)
    loss, _ = model.encoder_loss(x_a, x_b, labels)
    loss.backward()
    stacked = grads(model.net)
    model.zero_grad(set_to_none=True)
    model.batch_slots = False                                 # every view its own call: the straightforward loop
    loss2, _ = model.encoder_loss(x_a, x_b, labels)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    assert set(stacked) == set(grads(model.net))
    for k, g in grads(model.net).items():
        torch.testing.assert_close(stacked[k], g, msg=k)


def test_byol_masker_step_without_the_masked_target_pass_has_the_same_gradients():
    model = build("byol")
    x_a, x_b, _ = batch(0)
    full = copy.deepcopy(model)
    loss, _ = model.masker_loss(x_a, x_b)
    loss.backward()
    # the straightforward version: the target encodes every masked view and both BYOL terms are summed
    with torch.no_grad():
        m_b = full.masker(x_b)
    full.net.requires_grad_(False)
    m = full.masker(x_b)
    ssl = 0
    for n in range(N):
        x_bm = x_b * (1 - m[:, n:n + 1])
        with torch.no_grad():
            t_a, t_bm = full.target(x_a).z, full.target(x_bm).z
        ssl = ssl + byol_loss(full.net(x_a).p, t_bm) + byol_loss(full.net(x_bm).p, t_a)
    (-ssl + full.alpha * sparsity_penalty(m)).backward()
    assert torch.equal(m_b, m.detach())
    ours, reference = grads(model.masker), grads(full.masker)
    assert set(ours) == set(reference) and ours
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], msg=k)
