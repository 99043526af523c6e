"""Tests of the mask generator, encoders, losses and the two ADIOS objectives (CPU, seconds each).

The objectives are checked against naive loops written here from the paper's formulas, in float64.
"""
import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from adios import ADIOS, byol_tau, simclr_loss, sparsity_penalty
from encoders import SlotBatchNorm2d, SlotSyncBatchNorm, convert_to_slot_batchnorm, slot_statistics
from encoders import build_encoder
from masker import Masker



def tiny_encoder(feat_dim=16):
    """A small conv net with BatchNorm, so per-slot batch statistics matter in the checks."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, feat_dim, 3, stride=2, padding=1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_adios(method, num_masks=3, img=16, **kw):
    torch.manual_seed(0)
    masker = Masker(num_masks, img, base_channels=8) if num_masks else None
    heads = dict(proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=12)
    kw = {"alpha": 0.5, **kw}
    return ADIOS(tiny_encoder(), 16, masker, method=method, **heads, **kw).double()


def views(B=6, img=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, img, img, generator=g, dtype=torch.float64),
            torch.randn(B, 3, img, img, generator=g, dtype=torch.float64))


# ---- masker.py ----

@pytest.mark.parametrize("norm", ["gn", "in", "none"])
@pytest.mark.parametrize("img", [16, 32, 64, 96])
def test_masks_partition_every_pixel(norm, img):
    m = Masker(4, img, base_channels=8, norm=norm)
    masks = m(torch.randn(2, 3, img, img))
    assert masks.shape == (2, 4, img, img)
    assert (masks >= 0).all()
    torch.testing.assert_close(masks.sum(1), torch.ones(2, img, img))


def test_masker_block_count_and_table():
    assert Masker(2, 32).num_blocks == 4 and Masker(2, 96).num_blocks == 5 and Masker(2, 224).num_blocks == 6
    m = Masker(2, 96, base_channels=8)                        # the K = 5 row of the table
    assert [b[0].in_channels for b in m.down] == [3, 8, 8, 16, 16]
    assert [b[0].out_channels for b in m.down] == [8, 8, 16, 16, 16]
    assert [b[0].in_channels for b in m.up] == [32, 32, 32, 16, 16]
    assert [b[0].out_channels for b in m.up] == [16, 16, 8, 8, 8]
    assert m.mlp[0].in_features == 16 * 6 * 6 and m.mlp[2].out_features == 128


def test_unet_skips_carry_the_image_past_the_bottleneck():
    # With the bottleneck MLP silenced (its last layer zeroed), the masks can depend on the image only
    # through the U-Net's skip connections: they must still differ between images and across pixels.
    torch.manual_seed(0)
    m = Masker(4, 32, base_channels=8)
    with torch.no_grad():
        m.mlp[-2].weight.zero_()
        m.mlp[-2].bias.zero_()
    masks = m(torch.randn(2, 3, 32, 32))                      # (2, 4, 32, 32)
    assert (masks[0] - masks[1]).abs().max() > 1e-2
    assert masks[0].flatten(1).std(dim=1).max() > 1e-2


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_masks=3, img_size=100), "multiple of 16"),
    (dict(num_masks=3, img_size=32, base_channels=12), "GroupNorm"),
    (dict(num_masks=1, img_size=32), "at least 2"),
    (dict(num_masks=0, img_size=32), "at least 2"),
    (dict(num_masks=3, img_size=32, norm="bn"), "norm"),
])
def test_masker_rejects_what_it_cannot_take(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Masker(**kwargs)


# ---- encoders.py ----

@pytest.mark.parametrize("arch, img, dim", [("resnet18", 32, 512), ("resnet18", 64, 512),
                                            ("vit_tiny", 32, 192)])
def test_encoder_features(arch, img, dim):
    net, feat_dim = build_encoder(arch, img)
    assert feat_dim == dim and net(torch.randn(2, 3, img, img)).shape == (2, dim)


def test_resnet_stems_follow_the_size_rule():
    assert build_encoder("resnet18", 32)[0].conv1.kernel_size == (3, 3)
    assert build_encoder("resnet18", 96)[0].conv1.kernel_size == (7, 7)
    assert build_encoder("resnet18", 32, stem="standard")[0].conv1.kernel_size == (7, 7)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_weights_load_into_plain_torchvision(arch):
    net, _ = build_encoder(arch, 96)
    reference = getattr(torchvision.models, arch)()
    assert set(net.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}
    result = reference.load_state_dict(net.state_dict(), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(reference.layer4[-1].conv2.weight, net.layer4[-1].conv2.weight)


@pytest.mark.parametrize("arch, img", [("vgg", 32), ("vit_tiny", 40)])
def test_encoder_rejects_unknown_arch_and_unpatchable_size(arch, img):
    with pytest.raises(ValueError):
        build_encoder(arch, img)


# ---- losses ----

def naive_nt_xent(z1, z2, T):
    """Per anchor: −log(exp(s_pos/T) / Σ_{k ≠ anchor} exp(s_k/T)), averaged over the 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    B, total = z1.shape[0], 0.0
    for i in range(2 * B):
        pos = (i + B) % (2 * B)
        sims = torch.stack([z[i] @ z[k] / T for k in range(2 * B) if k != i])
        total = total - (z[i] @ z[pos] / T - torch.logsumexp(sims, 0))
    return total / (2 * B)


def test_simclr_loss_equals_naive_per_anchor():
    z1, z2 = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(simclr_loss(z1, z2, 0.2), naive_nt_xent(z1, z2, 0.2))


def constant_masks(areas, size=8):
    """Masks (B, 1, size, size) whose slot covers a fraction `areas[b]` of the image exactly."""
    return torch.tensor(areas, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 1, size, size)


def test_sparsity_penalty_shape():
    a = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    p = torch.stack([sparsity_penalty(constant_masks([x])) for x in a])
    torch.testing.assert_close(p, p.flip(0))                  # symmetric about 0.5
    assert p.argmin() == 49 and abs(p.min().item() - 1) < 1e-9   # minimal (= 1) at half the image
    assert sparsity_penalty(constant_masks([1e-7])) > 1e6
    assert sparsity_penalty(constant_masks([1 - 1e-7])) > 1e6
    assert sparsity_penalty(constant_masks([1.0])) > 1e9     # never negative at full coverage
    masks = torch.tensor([[0.2, 0.8], [0.5, 0.5]]).view(2, 2, 1, 1)
    expected = sum(torch.tensor([1 / math.sin(math.pi * a) for a in col]).mean() for col in ([.2, .5], [.8, .5]))
    torch.testing.assert_close(sparsity_penalty(masks), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparsity_penalty_upcasts_half_precision(dtype):
    masks = torch.zeros(4, 2, 8, 8, dtype=dtype)
    masks[:, 0] = 1                                           # one slot everything, one nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = sparsity_penalty(masks)
    assert p.dtype == torch.float32 and torch.isfinite(p) and p > 1e9


def test_byol_tau_schedule():
    assert byol_tau(0, 100) == pytest.approx(0.99) and byol_tau(100, 100) == pytest.approx(1.0)
    assert 0.99 < byol_tau(50, 100) < 1.0


# ---- the objectives against naive per-slot loops (float64) ----

def naive_ssl(model, x_a, x_b, m_a, m_b):
    """The released schedule: for every slot, encode the clean view(s) again, then the masked view(s)."""
    net, T, total = model.net, model.temperature, 0
    cos = lambda p, z: F.cosine_similarity(p, z.detach(), dim=-1).mean()
    for n in range(m_b.shape[1]):
        hide_b = m_b[:, n:n + 1]
        if model.method == "simclr":
            total = total + simclr_loss(net(x_a)[1], net(x_b * (1 - hide_b))[1], T)
        elif model.method == "byol":
            p_a, p_b = net(x_a)[2], net(x_b * (1 - hide_b))[2]
            with torch.no_grad():
                t_a, t_b = model.target(x_a)[1], model.target(x_b * (1 - hide_b))[1]
            total = total + (2 - 2 * cos(p_a, t_b)) + (2 - 2 * cos(p_b, t_a))
        else:
            _, z1, p1, _ = net(x_a)
            _, z2, p2, _ = net(x_b)
            _, z1m, p1m, _ = net(x_a * (1 - m_a[:, n:n + 1]))
            _, z2m, p2m, _ = net(x_b * (1 - hide_b))
            pairs = [(p1m, z2, p2m, z1), (p1, z2m, p2, z1m), (p1, z2, p2, z1), (p1m, z2m, p2m, z1m)]
            terms = [-(cos(a, b) + cos(c, d)) / 2 for a, b, c, d in pairs]
            total = total + sum(terms) / 4
    return total


def byol_constant_term(model, x_a, x_b, m_b):
    """Σ_n 2 − 2·cos(p_a, t_bm_n) for BYOL (0 otherwise): the masker step's term that no gradient uses."""
    if model.method != "byol":
        return 0
    with torch.no_grad():
        p_a = model.net(x_a)[2]
        return sum(2 - 2 * F.cosine_similarity(p_a, model.target(x_b * (1 - m_b[:, n:n + 1]))[1]).mean()
                   for n in range(m_b.shape[1]))


def all_terms(method):
    return dict(simsiam_masked_targets=True, simsiam_unmasked=True, simsiam_both_masked=True) \
        if method == "simsiam" else {}


def masks_of(model, x_a, x_b):
    m_b = model.masker(x_b)
    return (model.masker(x_a) if model.method == "simsiam" else None), m_b


def grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch_slots", [True, False], ids=["batched", "per-slot"])
@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam"])
def test_encoder_loss_gradients_equal_the_naive_loop(method, batch_slots):
    model = tiny_adios(method, batch_slots=batch_slots, **all_terms(method))
    x_a, x_b = views()
    naive = copy.deepcopy(model)
    loss, stats = model.encoder_loss(x_a, x_b)
    loss.backward()
    with torch.no_grad():
        m_a, m_b = masks_of(naive, x_a, x_b)
    naive_loss = naive_ssl(naive, x_a, x_b, m_a, m_b)
    naive_loss.backward()
    torch.testing.assert_close(loss, naive_loss)
    assert stats["ssl_loss"] == pytest.approx(naive_loss.item())
    ours, reference = grads(model.net), grads(naive.net)
    assert set(ours) == set(reference) and len(ours) > 10
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], msg=k)
    assert all(p.grad is None for p in model.masker.parameters())


@pytest.mark.parametrize("batch_slots", [True, False], ids=["batched", "per-slot"])
@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam"])
def test_masker_loss_gradients_equal_the_naive_loop(method, batch_slots):
    model = tiny_adios(method, batch_slots=batch_slots, alpha_entropy=0.3, **all_terms(method))
    x_a, x_b = views()
    naive = copy.deepcopy(model)
    loss, stats = model.masker_loss(x_a, x_b)
    loss.backward()
    assert all(p.grad is None for p in model.net.parameters())    # encoder and heads untouched
    assert all(p.requires_grad for p in model.net.parameters())   # and unfrozen again

    naive.net.requires_grad_(False)
    m_a, m_b = masks_of(naive, x_a, x_b)
    penalty = sparsity_penalty(m_b) + (sparsity_penalty(m_a) if m_a is not None else 0)
    # α₂'s term: each image's slot areas (SimSiam: both views' 2N) through a softmax; the entropy H of
    # that distribution, summed over the batch, is added to what the masker minimises.
    areas = torch.cat([m.mean(dim=(2, 3)) for m in (m_a, m_b) if m is not None], dim=1)     # (B, N or 2N)
    p = areas.exp() / areas.exp().sum(dim=1, keepdim=True)
    entropy = -(p * p.log()).sum()
    naive_loss = -naive_ssl(naive, x_a, x_b, m_a, m_b) + naive.alpha * penalty + 0.3 * entropy
    naive_loss.backward()
    # BYOL's masker step leaves out Σ_n 2 − 2·cos(p_a, t_bm): the target is constant in φ, and so is that term.
    torch.testing.assert_close(loss, naive_loss + byol_constant_term(naive, x_a, x_b, m_b))
    assert stats["penalty"] == pytest.approx(penalty.item())
    ours, reference = grads(model.masker), grads(naive.masker)
    assert set(ours) == set(reference) == {k for k, _ in model.masker.named_parameters()}
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], msg=k)


def test_adios_s_simsiam_takes_one_slot_area_entropy_per_view():
    # SimSiam's α₂ term pools both views' 2N slot areas per image; ADIOS-s SimSiam (the released
    # simsiam_adios_s) takes one entropy per view. H = −Σ_b Σ_n p log p, p = softmax of the areas.
    g = torch.Generator().manual_seed(0)
    m_a, m_b = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64).softmax(dim=2)   # (B, N, H, W) each
    entropy = lambda areas: -(areas.softmax(1) * areas.log_softmax(1)).sum()           # noqa: E731
    a_a, a_b = m_a.mean(dim=(2, 3)), m_b.mean(dim=(2, 3))                               # (B, N) each
    pooled = tiny_adios("simsiam").slot_entropy(m_a, m_b)
    per_view = tiny_adios("simsiam", single_mask=True).slot_entropy(m_a, m_b)
    torch.testing.assert_close(pooled, entropy(torch.cat([a_a, a_b], dim=1)))
    torch.testing.assert_close(per_view, entropy(a_a) + entropy(a_b))


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_a_masker_step_raises_the_ssl_loss(method):
    model = tiny_adios(method, alpha=0.0)
    x_a, x_b = views(B=8)
    opt = torch.optim.SGD(model.masker.parameters(), lr=0.05)
    before = None
    for _ in range(3):
        loss, stats = model.masker_loss(x_a, x_b)
        before = stats["ssl_loss"] if before is None else before
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, after = model.masker_loss(x_a, x_b)
    assert after["ssl_loss"] > before


@pytest.mark.parametrize("momentum", [0.1, None])
def test_slot_batchnorm_equals_one_call_per_slot(momentum):
    """Running statistics and outputs of the batched slots equal S separate train-mode calls."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=momentum).double()
    plain.weight.data.uniform_(0.5, 1.5)
    slotted = convert_to_slot_batchnorm(nn.Sequential(copy.deepcopy(plain)))[0]
    assert isinstance(slotted, SlotBatchNorm2d)
    x = torch.randn(3, 5, 4, 6, 6, dtype=torch.float64) * torch.arange(1, 4).view(3, 1, 1, 1, 1)
    expected = torch.cat([plain(x[s]) for s in range(3)])
    with slot_statistics(slotted, 3):
        out = slotted(x.flatten(0, 1))
    torch.testing.assert_close(out, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(slotted, name), getattr(plain, name))
    assert slotted.slots == 1                                  # restored after the block


def test_sync_conversion_keeps_weights_and_state_dict_keys():
    """Multi-process runs swap in SlotSyncBatchNorm (per-slot statistics over all ranks; test_distributed.py runs it)."""
    model = tiny_adios("byol")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for module in (model.net, model.target):
        convert_to_slot_batchnorm(module, sync=True)
    assert sum(isinstance(m, SlotSyncBatchNorm) for m in model.modules()) == count == 7
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_stats_report_areas():
    model = tiny_adios("simclr", num_masks=3)
    _, stats = model.masker_loss(*views())
    areas = [stats[f"area_{n}"] for n in range(3)]
    assert sum(areas) == pytest.approx(1.0)
    assert all(stats[f"area_{n}_min"] <= stats[f"area_{n}"] <= stats[f"area_{n}_max"] for n in range(3))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam"])
def test_single_mask_and_no_mask_baseline_run(method):
    x_a, x_b = views()
    s = tiny_adios(method, single_mask=True)
    for loss, _ in (s.encoder_loss(x_a, x_b), s.masker_loss(x_a, x_b)):
        assert torch.isfinite(loss)
        loss.backward()
    base = tiny_adios(method, num_masks=0)
    assert base.num_masks == 0 and base.masker is None
    loss, stats = base.encoder_loss(x_a, x_b)
    loss.backward()
    assert torch.isfinite(loss) and stats["penalty"] == 0
    with pytest.raises(RuntimeError):
        base.masker_loss(x_a, x_b)


def test_single_mask_costs_one_slot():
    """ADIOS-s with slot n forced equals ADIOS's slot-n term alone."""
    model = tiny_adios("simclr", single_mask=True)
    x_a, x_b = views()
    torch.manual_seed(3)
    loss, _ = model.encoder_loss(x_a, x_b)
    torch.manual_seed(3)
    pick = torch.randint(3, (x_b.shape[0],))
    with torch.no_grad():
        m = model.masker(x_b)
    hide = m[torch.arange(x_b.shape[0]), pick].unsqueeze(1)
    torch.testing.assert_close(loss, simclr_loss(model.net(x_a)[1], model.net(x_b * (1 - hide))[1], 0.2))


def test_online_probe_trains_only_the_probe():
    model = tiny_adios("simclr", num_classes=4)
    x_a, x_b = views()
    labels = torch.tensor([0, 1, -1, 3, 2, -1])
    loss, stats = model.encoder_loss(x_a, x_b, labels)
    ssl_only, _ = copy.deepcopy(model).encoder_loss(x_a, x_b)
    torch.testing.assert_close(loss - ssl_only, stats["online_ce"].double())
    assert stats["online_acc"] in (0, 25, 50, 75, 100)           # in %, over the 4 labelled images only
    unlabelled, st = model.encoder_loss(x_a, x_b, torch.full((6,), -1))
    assert torch.isfinite(unlabelled) and st["online_ce"] == 0


def test_momentum_update_moves_target_toward_online():
    model = tiny_adios("byol")
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    online = list(model.encoder.parameters()) + list(model.projector.parameters())
    gap = lambda: sum((t - o).abs().sum() for t, o in zip(model.target.parameters(), online))
    before = gap()
    model.momentum_update(0.9)
    torch.testing.assert_close(gap(), 0.9 * before)
    assert all(not p.requires_grad for p in model.target.parameters())


def test_public_attributes():
    model = tiny_adios("byol", num_masks=4, single_mask=True)
    assert (model.method, model.num_masks, model.alpha, model.temperature, model.single_mask) == \
        ("byol", 4, 0.5, 0.2, True)
    assert model.encoder is model.net.encoder and model.predictor is not None
    assert tiny_adios("simclr").predictor is None
    assert not any(k.startswith("players") for k in model.state_dict())


# ---- SimCLR negatives across ranks (gloo, two processes) ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cross_rank_worker(rank, world, port, z1, z2, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    B = z1.shape[0] // world
    a = z1[rank * B:(rank + 1) * B].clone().requires_grad_()
    b = z2[rank * B:(rank + 1) * B].clone().requires_grad_()
    loss = simclr_loss(a, b, 0.2)
    loss.backward()
    out[rank] = (loss.detach(), a.grad, b.grad)
    dist.destroy_process_group()


def test_cross_rank_simclr_equals_one_process_on_the_whole_batch():
    world = 2
    z1, z2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    out = mp.Manager().dict()
    mp.spawn(_cross_rank_worker, args=(world, free_port(), z1, z2, out), nprocs=world)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    whole = simclr_loss(a, b, 0.2)
    whole.backward()
    # Each rank's loss is the mean over its anchors; their average is the whole batch's loss, and
    # DDP's averaging of the gradients (÷ world) gives the whole batch's gradient.
    torch.testing.assert_close(sum(out[r][0] for r in range(world)) / world, whole)
    torch.testing.assert_close(torch.cat([out[r][1] for r in range(world)]) / world, a.grad)
    torch.testing.assert_close(torch.cat([out[r][2] for r in range(world)]) / world, b.grad)
