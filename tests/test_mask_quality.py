"""Tests of mask_quality.py: the adjusted Rand index against pair counting, and the masks' quality scores
(CPU, seconds)."""
import itertools

import pytest
import torch

from mask_quality import adjusted_rand_index, mask_quality


def naive_ari(pred, true):
    """ARI of one image by counting every pixel pair (the definition, no contingency table)."""
    pairs = list(itertools.combinations(range(len(pred)), 2))
    both = sum(pred[i] == pred[j] and true[i] == true[j] for i, j in pairs)
    same_p = sum(pred[i] == pred[j] for i, j in pairs)
    same_t = sum(true[i] == true[j] for i, j in pairs)
    expected = same_p * same_t / len(pairs)
    return (both - expected) / ((same_p + same_t) / 2 - expected)


def test_ari_matches_pair_counting():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randint(0, 3, (3, 7, 7), generator=g), torch.randint(0, 4, (3, 7, 7), generator=g)
    true[0, :4] = 0                                           # some structure, so ARI is not ~0
    pred[0, :4] = 2
    reference = sum(naive_ari(p.flatten().tolist(), t.flatten().tolist()) for p, t in zip(pred, true)) / 3
    assert adjusted_rand_index(pred, true) == pytest.approx(reference, abs=1e-9)


def test_ari_perfect_relabelled_random_and_degenerate():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 4, (4, 8, 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)  # (4, 64, 64)
    assert adjusted_rand_index(true, true) == pytest.approx(1.0)
    relabelled = torch.tensor([7, 2, 9, 0])[true]            # the slots in another order, other values
    assert adjusted_rand_index(relabelled, true) == pytest.approx(1.0)
    random = torch.randint(0, 5, true.shape, generator=g)
    assert abs(adjusted_rand_index(random, true)) < 0.05
    one = torch.zeros(2, 16, 16, dtype=torch.long)            # one cluster in both: identical maps
    assert adjusted_rand_index(one, one + 3) == 1.0
    assert adjusted_rand_index(random[:2, :16, :16], one) == pytest.approx(0.0)   # one vs many: no agreement


def test_foreground_ari_ignores_background():
    true = torch.zeros(1, 8, 8, dtype=torch.long)
    true[0, :4, :4], true[0, 4:, 4:] = 1, 2
    pred = true.clone()
    pred[0, :4, 4:] = 1                                       # background wrongly merged with object 1
    assert adjusted_rand_index(pred, true) < 1
    assert adjusted_rand_index(pred, true, ignore=0) == pytest.approx(1.0)


def test_mask_quality_perfect_and_one_slot():
    g = torch.Generator().manual_seed(1)
    objects = torch.randint(0, 3, (2, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    perfect = torch.nn.functional.one_hot(objects, 4).permute(0, 3, 1, 2).float()   # (2, 4, 16, 16)
    q = mask_quality(perfect * 0.9 + 0.025, objects)          # soft, but the argmax is exact
    assert q == pytest.approx(dict(ari=1.0, ari_fg=1.0, miou=1.0))
    everything = torch.zeros(2, 4, 16, 16)
    everything[:, 1] = 1                                      # one slot covers the whole image
    areas = [(objects[b] == k).float().mean().item() for b in range(2) for k in (1, 2) if (objects[b] == k).any()]
    assert mask_quality(everything, objects)["miou"] == pytest.approx(sum(areas) / len(areas))
