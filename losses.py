"""The base methods' losses ADIOS is built on (paper Sec. 4): SimCLR's NT-Xent with negatives from every
process, BYOL's and SimSiam's negative cosine with its stop-gradient, and BYOL's EMA rate τ. Needs torch
alone. README: "Reading guide".
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def simclr_loss(z1, z2, temperature=0.2, gather=True, z1_all=None):
    """NT-Xent (SimCLR, Chen et al. 2020, Eq. 1): mean over the 2B anchors of this rank.

    z1, z2: (B, D) embeddings of two views; row i of z1 and row i of z2 are the positive pair.
    gather=True (the default) uses every rank's embeddings as negatives through GatherWithGrad, so
    K processes with batch B each compute the loss of one process with batch K·B (the released code
    used the local batch only); with one process it changes nothing. z1_all: normalised_and_gathered(z1,
    gather), when several calls share z1 (ADIOS's slots): one gather, and one all-reduce in backward.
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)     # logits in at least float32
    z1, z2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)
    B = z1.shape[0]
    rank, world = distributed_world() if gather else (0, 1)
    all1 = z1_all if z1_all is not None else normalised_and_gathered(z1, gather)        # (WB, D)
    all2 = GatherWithGrad.apply(z2) if world > 1 else z2
    anchors = torch.cat([z1, z2])                             # (2B, D)
    candidates = torch.cat([all1, all2])                      # (2WB, D)
    logits = anchors @ candidates.T / temperature             # (2B, 2WB)
    mine = torch.arange(B, device=z1.device) + rank * B       # this rank's rows within all1/all2
    self_idx = torch.cat([mine, mine + world * B])            # (2B,) each anchor's own column
    pos_idx = torch.cat([mine + world * B, mine])             # (2B,) the other view of the same image
    is_self = F.one_hot(self_idx, logits.shape[1]).bool()
    logits = logits.masked_fill(is_self, float("-inf"))       # an embedding is not its own negative
    return F.cross_entropy(logits, pos_idx)


def normalised_and_gathered(z, gather=True):
    """z (B, D) L2-normalised in at least float32, as NT-Xent's candidates: every rank's rows (W·B, D)
    through GatherWithGrad with several processes and gather=True, else this rank's (B, D)."""
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
    return GatherWithGrad.apply(z) if gather and distributed_world()[1] > 1 else z


def byol_loss(p, z):
    """BYOL (Grill et al. 2020, Eq. 2): 2 − 2·cos(p, sg(z)), mean over the batch. p, z: (B, D)."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()   # z.detach(): the stop-gradient


def simsiam_loss(p, z):
    """SimSiam (Chen & He 2021, Eq. 1): −cos(p, sg(z)), mean over the batch. p, z: (B, D)."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()          # z.detach(): the stop-gradient


def symmetric_simsiam(p1, z2, p2, z1):
    """½ D(p1, z2) + ½ D(p2, z1): one symmetrised SimSiam term."""
    return (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2


def byol_tau(step, total_steps, tau_base=0.99, tau_final=1.0):
    """BYOL's EMA rate: τ rises from tau_base to tau_final on a cosine over all steps (BYOL Sec. 3.2)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2


# ---- negatives from every process (torchrun) -------------------------------------------------------

class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward is correct: (B, D) on each rank → (W·B, D).

    Every rank's loss uses every rank's embeddings, so the gradient for this rank's slice is the
    SUM over ranks of the gradients each loss sends it: backward all-reduces, then takes the slice.
    (The released code's gather returns only the local gradient and loses the cross-rank terms;
    torch.distributed.all_gather alone has no gradient at all.) Needs equal B on every rank.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)                               # (W·B, D)

    @staticmethod
    def backward(ctx, grad):                                  # grad: (W·B, D)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        B = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * B:(r + 1) * B]                        # (B, D)


def distributed_world():
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
