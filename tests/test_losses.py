"""Tests of losses.py: NT-Xent against its definition, BYOL's τ schedule, and SimCLR's negatives gathered
across ranks (two gloo processes, CPU, float64)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import free_port         # one free localhost port for the gloo processes
from losses import byol_tau, normalised_and_gathered, simclr_loss


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


def test_byol_tau_schedule():
    assert byol_tau(0, 100) == pytest.approx(0.99) and byol_tau(100, 100) == pytest.approx(1.0)
    assert 0.99 < byol_tau(50, 100) < 1.0


# ---- SimCLR negatives across ranks (gloo, two processes) ----

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
