"""Tests of adios.py: the two ADIOS objectives, the sparsity penalty, ADIOS-s, the online probe, the stats,
BYOL's momentum update and the public attributes (CPU, seconds each).

The objectives are checked against the authors' per-slot loop (released_loop.py), in float64. The mask
generator, encoders, losses and per-slot BatchNorm have their tests in tests/ (test_masker.py, test_encoders.py,
test_losses.py, test_batchnorm.py).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adios
import encoders
import released_loop
from adios import ADIOS, sparsity_penalty
from losses import simclr_loss
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


# ---- the sparsity penalty ----

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


# ---- the objectives against naive per-slot loops (float64) ----

def naive_ssl(model, x_a, x_b, m_a, m_b):
    """Σ_n L_ssl as the authors' loop computes it (released_loop.py): for every slot the clean view(s)
    encoded again, then the masked view(s), one call each."""
    return sum(released_loop.slot_loss(model, x_a, x_b, h_a, h_b) for h_a, h_b in released_loop.hides(m_a, m_b, None))


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


def test_stats_report_areas():
    model = tiny_adios("simclr", num_masks=3)
    _, stats = model.masker_loss(*views())
    areas = [stats[f"area_{n}"] for n in range(3)]
    assert sum(areas) == pytest.approx(1.0)
    assert all(stats[f"area_{n}_min"] <= stats[f"area_{n}"] <= stats[f"area_{n}_max"] for n in range(3))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_the_stats_stay_on_the_device():
    torch.manual_seed(0)
    model = adios.ADIOS(encoders.build_encoder("resnet18", 32, "standard")[0], 512, masker=None, num_classes=4,
                        proj_hidden_dim=16, proj_output_dim=8)
    x = torch.randn(2, 4, 3, 32, 32)
    _, stats = model.encoder_loss(x[0], x[1], torch.tensor([0, 1, -1, 3]))
    assert {"ssl_loss", "penalty", "online_ce", "online_acc"} <= set(stats)
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
    # The DDP wrappers live in model.ddp (a plain dict, empty in one process): never in the state_dict.
    assert model.ddp == {}
    assert not any(k.split(".")[0] == "ddp" or "module" in k.split(".") for k in model.state_dict())
