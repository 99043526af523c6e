"""BatchNorm state as released (CPU, float64, seconds): after every iteration, the running statistics of f_θ
(and of BYOL's target) equal what the released training_step's sequence of forward passes leaves, replayed
here on plain torch BatchNorm modules; and the work skipped or done once gives the same gradients.
README: "BatchNorm state".
"""
import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import eval_linear
import train
from test_adios import free_port         # one free localhost port for the gloo processes
from adios import ADIOS, byol_loss, normalised_and_gathered, released_order, simclr_loss, simsiam_loss, sparsity_penalty
from encoders import (SlotBatchNormMixin, apply_statistics, convert_to_slot_batchnorm, deferred_statistics,
                      slot_statistics)
from encoders import build_encoder
from masker import Masker

B, IMG, N = 6, 16, 3


def tiny_encoder(feat_dim=16):
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, feat_dim, 3, stride=2, padding=1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build(method, num_masks=N, single_mask=False):
    torch.manual_seed(0)
    masker = Masker(num_masks, IMG, base_channels=8) if num_masks else None
    terms = dict(simsiam_masked_targets=True, simsiam_unmasked=True, simsiam_both_masked=True) \
        if method == "simsiam" else {}
    return ADIOS(tiny_encoder(), 16, masker, method=method, alpha=0.5, single_mask=single_mask, proj_hidden_dim=32,
                 proj_output_dim=8, pred_hidden_dim=12, num_classes=4, **terms).double()


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


# ---- the released training_step, transcribed forward pass by forward pass ---------------------------

def released_slot(model, x_a, x_b, hide_a, hide_b):
    """One slot of the released inpaint/mask forward: the clean view(s) again, then the masked view(s), each
    through the backbone and then the heads, in the released code's order. Returns L_ssl of the slot."""
    enc, proj, pred = model.net.encoder, model.net.projector, model.net.predictor
    x_bm = x_b if hide_b is None else x_b * (1 - hide_b)
    if model.method == "simclr":
        f1, f2 = enc(x_a), enc(x_bm)
        return simclr_loss(proj(f1), proj(f2), model.temperature)
    if model.method == "byol":
        with torch.no_grad():
            t1, t2 = model.target.encoder(x_a), model.target.encoder(x_bm)
            t1, t2 = model.target.projector(t1), model.target.projector(t2)
        f1, f2 = enc(x_a), enc(x_bm)
        z1, z2 = proj(f1), proj(f2)
        return byol_loss(pred(z1), t2) + byol_loss(pred(z2), t1)
    x_am = x_a if hide_a is None else x_a * (1 - hide_a)
    z1, z2 = proj(enc(x_a)), proj(enc(x_b))
    if hide_b is None:                                        # the base method: one pair
        return simsiam_loss(pred(z1), z2) / 2 + simsiam_loss(pred(z2), z1) / 2
    z1m, z2m = proj(enc(x_am)), proj(enc(x_bm))
    p1, p2, p1m, p2m = pred(z1), pred(z2), pred(z1m), pred(z2m)
    pairs = [(p1m, z2), (p2m, z1), (p2, z1m), (p1, z2m), (p1, z2), (p2, z1), (p1m, z2m), (p2m, z1m)]
    return torch.stack([simsiam_loss(p, z) for p, z in pairs]).mean()


def released_probe(model, x_a, x_b, labels):
    """The online probe's step (BaseModel.training_step): the backbone on each crop, the mean of the two
    cross-entropies; BYOL's momentum backbone encodes both crops as well (BaseMomentumModel)."""
    ce = 0
    for x in (x_a, x_b):
        ce = ce + F.cross_entropy(model.net.classifier(model.net.encoder(x).detach()), labels, ignore_index=-1)
    if model.method == "byol":
        with torch.no_grad():
            model.target.encoder(x_a), model.target.encoder(x_b)
    return ce / 2


def released_hides(model, m, pick):
    """The masks of the slot loop: every slot's, or ADIOS-s's one picked slot per image."""
    if m is None:
        return [None]
    if pick is not None:
        return [m[torch.arange(B), pick].unsqueeze(1)]
    return [m[:, n:n + 1] for n in range(m.shape[1])]


def released_iteration(model, x_a, x_b, labels, opt_enc, opt_mask, masker_pick=None):
    """One released iteration: encoder step (slot loop + probe), masker step (slot loop), BYOL's EMA.
    masker_pick: "encoder" makes the masker step's BYOL target encode the encoder step's ADIOS-s slot,
    the one departure of ours (README "BatchNorm state")."""
    M, simsiam = model.masker, model.method == "simsiam"
    if M is None:                                             # the base method: one pass over a and b
        f1, f2 = model.net.encoder(x_a), model.net.encoder(x_b)
        logits = [model.net.classifier(f.detach()) for f in (f1, f2)]
        ce = sum(F.cross_entropy(lg, labels, ignore_index=-1) for lg in logits) / 2
        if model.method == "byol":
            with torch.no_grad():
                t1, t2 = model.target.encoder(x_a), model.target.encoder(x_b)
                t1, t2 = model.target.projector(t1), model.target.projector(t2)
            z1, z2 = model.net.projector(f1), model.net.projector(f2)
            ssl = byol_loss(model.net.predictor(z1), t2) + byol_loss(model.net.predictor(z2), t1)
        elif model.method == "simclr":
            ssl = simclr_loss(model.net.projector(f1), model.net.projector(f2), model.temperature)
        else:
            z1, z2 = model.net.projector(f1), model.net.projector(f2)
            ssl = simsiam_loss(model.net.predictor(z1), z2) / 2 + simsiam_loss(model.net.predictor(z2), z1) / 2
        opt_enc.zero_grad(set_to_none=True)
        (ssl + ce).backward()
        opt_enc.step()
    else:
        with torch.no_grad():
            m_a, m_b = (M(x_a) if simsiam else None), M(x_b)
        pick = torch.randint(N, (B,)) if model.single_mask else None
        hides = zip(released_hides(model, m_a, pick) if simsiam else [None] * 9, released_hides(model, m_b, pick))
        ssl = sum(released_slot(model, x_a, x_b, ha, hb) for ha, hb in hides)
        loss = ssl + released_probe(model, x_a, x_b, labels)
        opt_enc.zero_grad(set_to_none=True)
        loss.backward()
        opt_enc.step()
        # masker step: the same slot loop, f_θ frozen, gradients to the masks
        model.net.requires_grad_(False)
        m_a, m_b = (M(x_a) if simsiam else None), M(x_b)
        first_pick, pick = pick, torch.randint(N, (B,)) if model.single_mask else None
        target_pick = first_pick if masker_pick == "encoder" else pick
        ssl = 0
        for ha, hb, tb in zip(released_hides(model, m_a, pick) if simsiam else [None] * 9,
                              released_hides(model, m_b, pick), released_hides(model, m_b.detach(), target_pick)):
            if model.method == "byol":                        # the target's masked view: tb
                with torch.no_grad():
                    t1 = model.target.projector(model.target.encoder(x_a))
                    t2 = model.target.projector(model.target.encoder(x_b * (1 - tb)))
                f1, f2 = model.net.encoder(x_a), model.net.encoder(x_b * (1 - hb))
                z1, z2 = model.net.projector(f1), model.net.projector(f2)
                ssl = ssl + byol_loss(model.net.predictor(z1), t2) + byol_loss(model.net.predictor(z2), t1)
            else:
                ssl = ssl + released_slot(model, x_a, x_b, ha, hb)
        penalty = sparsity_penalty(m_b) + (sparsity_penalty(m_a) if simsiam else 0)
        opt_mask.zero_grad(set_to_none=True)
        (-ssl + model.alpha * penalty).backward()
        opt_mask.step()
        model.net.requires_grad_(True)
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


CASES = [(m, n, s) for m in ("simclr", "byol", "simsiam") for n, s in ((N, False), (N, True), (0, False))]


@pytest.mark.parametrize("method, num_masks, single", CASES,
                         ids=[f"{m}-{'base' if not n else 'adios-s' if s else 'adios'}" for m, n, s in CASES])
def test_batchnorm_state_equals_the_released_sequence(method, num_masks, single):
    ours = build(method, num_masks, single)
    released = plain_copy(ours)
    opts, ref_opts = optimisers(ours), optimisers(released)
    assert len(buffers(ours)) == len(buffers(released)) > 0
    for it in range(2):
        x_a, x_b, labels = batch(it)
        torch.manual_seed(10 + it)                            # ADIOS-s: the same slot draws on both sides
        our_iteration(ours, x_a, x_b, labels, *opts)
        torch.manual_seed(10 + it)
        released_iteration(released, x_a, x_b, labels, *ref_opts, masker_pick="encoder")
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


def test_released_order_of_one_simclr_iteration():
    # two slots: per slot a then bm_n; the probe's a, b through the backbone only; the masker step's loop
    assert released_order("simclr", 2, "encoder", "encoder") == ["a", "bm0", "a", "bm1", "a", "b"]
    assert released_order("simclr", 2, "encoder", "heads") == ["a", "bm0", "a", "bm1"]
    assert released_order("simclr", 2, "masker", "encoder") == ["a", "bm0", "a", "bm1"]
    assert released_order("simsiam", 1, "masker", "heads") == ["a", "b", "am0", "bm0"]
    assert released_order("byol", 1, "encoder", "target_encoder") == ["a", "bm0", "a", "b", "a", "bm0"]
    assert released_order("byol", 1, "masker", "target_heads") == []


@pytest.mark.parametrize("momentum", [0.1, None])
def test_blending_in_closed_form_equals_one_call_per_batch(momentum):
    """apply_statistics over an order with repeats equals plain BatchNorm called on those batches in order."""
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * s for n, s in (("a", 1), ("b", 3), ("c", .5))}
    plain = nn.BatchNorm2d(4, momentum=momentum).double()
    ours = convert_to_slot_batchnorm(nn.Sequential(copy.deepcopy(plain)))
    order = ["a", "b", "a", "c", "a", "a", "b"]
    for n in order:
        plain(xs[n])
    with deferred_statistics(ours), slot_statistics(ours, ["a", "b", "c"]):
        out = ours(torch.cat([xs["a"], xs["b"], xs["c"]]))
        assert ours[0].running_mean.abs().sum() == 0          # nothing moved yet
        apply_statistics([ours], order)
    torch.testing.assert_close(out[:5], nn.functional.batch_norm(xs["a"], None, None, training=True))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours[0], name), getattr(plain, name))


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


# ---- SimCLR: the clean projection gathered once per step (two gloo processes) --------------------------

def _gather_once_worker(rank, world, port, z_a, z_bms, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    Bl = z_a.shape[0] // world
    results = []
    for once in (False, True):                                # per slot (the straightforward version), then once
        a = z_a[rank * Bl:(rank + 1) * Bl].clone().requires_grad_()
        bms = [z[rank * Bl:(rank + 1) * Bl].clone().requires_grad_() for z in z_bms]
        z_all = normalised_and_gathered(a) if once else None
        loss = sum(simclr_loss(a, bm, 0.2, z1_all=z_all) for bm in bms)
        loss.backward()
        results.append((loss.detach(), a.grad, [bm.grad for bm in bms]))
    out[rank] = results
    dist.destroy_process_group()


def test_simclr_clean_side_gathered_once_gives_the_per_slot_gradients():
    world, n_slots = 2, 3
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(8, 5, generator=g, dtype=torch.float64)
    z_bms = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(n_slots)]
    out = mp.Manager().dict()
    mp.spawn(_gather_once_worker, args=(world, free_port(), z_a, z_bms, out), nprocs=world)
    for r in range(world):
        (loss, ga, gbm), (loss1, ga1, gbm1) = out[r]
        torch.testing.assert_close(loss1, loss)
        torch.testing.assert_close(ga1, ga)
        for x, y in zip(gbm1, gbm):
            torch.testing.assert_close(x, y)
    # and both equal one process holding the whole batch (no gather at all): the ranks' mean loss, and
    # their gradients ÷ world (DDP's averaging), are the whole batch's
    a, bms = z_a.clone().requires_grad_(), [z.clone().requires_grad_() for z in z_bms]
    whole = sum(simclr_loss(a, bm, 0.2) for bm in bms)
    whole.backward()
    torch.testing.assert_close(sum(out[r][1][0] for r in range(world)) / world, whole)
    torch.testing.assert_close(torch.cat([out[r][1][1] for r in range(world)]) / world, a.grad)
    for n in range(n_slots):
        torch.testing.assert_close(torch.cat([out[r][1][2][n] for r in range(world)]) / world, bms[n].grad)


# ---- eval_linear.py --precise_bn ---------------------------------------------------------------------

def test_precise_batchnorm_is_the_cumulative_average_over_clean_batches():
    torch.manual_seed(0)
    encoder = tiny_encoder().double()
    bn = encoder[1]
    bn.running_mean.fill_(5.0)                                # what training left: to be replaced
    images = torch.randn(12, 3, IMG, IMG, dtype=torch.float64) * 2 + 1
    drawn = []                                                # the shuffled order the loader takes

    class Recorded(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            drawn.append(i)
            return super().__getitem__(i)

    dataset = Recorded(images, torch.zeros(12, dtype=torch.long))
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if "running" not in k and "num_b" not in k}
    seen = eval_linear.precise_batchnorm(encoder.eval(), dataset, 2, 4, 0, torch.device("cpu"), seed=3)
    assert seen == 8 and not encoder.training and bn.momentum == 0.1
    # by hand: the first BatchNorm's input is conv(x); its statistics per shuffled batch, averaged with equal weights
    order = torch.tensor(drawn)
    assert len(order) == 8 and len(set(drawn)) == 8
    with torch.no_grad():
        outs = [encoder[0](images[order[i:i + 4]]) for i in (0, 4)]                   # 2 × (4, 8, h, w)
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in outs]).mean(0)   # unbiased
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    assert int(bn.num_batches_tracked) == 2
    for k, v in weights.items():
        assert torch.equal(encoder.state_dict()[k], v), k


def test_eval_linear_precise_bn_flag(tmp_path, capsys):
    run = ["--random_init", "--arch", "resnet18", "--img_size", "32", "--stem", "standard", "--dataset", "shapes",
           "--num_images", "64", "--epochs", "1", "--workers", "0", "--device", "cpu", "--batch_size", "16",
           "--mask_images", "0", "--output_dir", str(tmp_path)]
    assert eval_linear.get_args_parser().parse_args(run).precise_bn == 0            # off by default
    results = eval_linear.main([*run, "--precise_bn", "2"])
    assert results["precise_bn"] == 2 and "over 32 clean training images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        eval_linear.main([*run, "--precise_bn", "-1"])
    assert exit_.value.code == 2 and "--precise_bn -1" in capsys.readouterr().err


# ---- ViT initialisation as the released runs' timm (0.4.12–0.5.x) -------------------------------------

@pytest.mark.parametrize("arch, width", [("vit_tiny", 192), ("vit_small", 384)])
def test_vit_draws_from_timm_distributions(arch, width):
    torch.manual_seed(0)
    net, feat_dim = build_encoder(arch, 32)
    assert feat_dim == width

    def normal02(t):                                          # std .02 within 10 %, centred, inside ±2
        return abs(t.std().item() - .02) < .1 * .02 and t.abs().max() < 2 and abs(t.mean()) < .002

    assert normal02(net.class_token) and normal02(net.encoder.pos_embedding)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    attentions = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(linears) == 12 * 3 and len(attentions) == 12                 # fc1, fc2, out_proj per block
    for m in linears:
        assert normal02(m.weight) and torch.all(m.bias == 0)
    for m in attentions:
        assert normal02(m.in_proj_weight) and torch.all(m.in_proj_bias == 0)
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # the patch embedding: PyTorch's default Conv2d draw, uniform in ±1/√fan_in (fan_in = 3·16·16)
    bound = 1 / (3 * 16 * 16) ** 0.5
    w, b = net.conv_proj.weight, net.conv_proj.bias
    assert w.abs().max() <= bound and abs(w.std().item() - bound / 3 ** 0.5) < .05 * bound
    assert b.abs().max() <= bound and b.abs().max() > bound / 2
