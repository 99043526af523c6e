"""ADIOS (Shi, Siddharth, Torr, Kosiorek, "Adversarial Masking for Self-Supervised Learning", ICML 2022).

The two objectives of Sec. 2 come first in `ADIOS`: f_θ minimises Σ_n L_ssl(f(x_a), f(x_b ⊙ (1 − m_n)))
over the N masks m = M_φ(x_b); M_φ (masker.py) maximises that sum minus α·P. What they are made of
follows. Needs torch, and encoders.py for the heads and per-slot BatchNorm. README: "Reading guide".
"""
import contextlib
import copy
import inspect
import math
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from encoders import (byol_mlp, convert_to_slot_batchnorm, simclr_projector, simsiam_predictor,
                      simsiam_projector, slot_statistics)

METHODS = ("simclr", "byol", "simsiam")


class ADIOS(nn.Module):
    """f_θ and M_φ, and the two objectives of Sec. 2 (arguments: see __init__)."""

    def __init__(self, encoder, feat_dim, masker=None, method="simclr", alpha=1.0, temperature=0.2,
                 single_mask=False, proj_hidden_dim=2048, proj_output_dim=256, pred_hidden_dim=None,
                 num_classes=0, simsiam_masked_targets=False, simsiam_unmasked=False,
                 simsiam_both_masked=False, gather_negatives=True, batch_slots=True, alpha_entropy=0.0):
        """encoder: (B, 3, H, W) → (B, feat_dim), e.g. encoders.build_encoder. masker: M_φ, or None for the
        plain base method (N = 0); ADIOS needs of it `masker.num_masks` (N) and masker(x) → (B, N, H, W),
        N masks that sum to 1 at every pixel (masker.Masker; the fixed-mask baselines give N = 1).
        method: simclr, byol or simsiam. alpha: α, weight of P; alpha_entropy: α₂ (0 in most runs).
        temperature: SimCLR's T. single_mask: ADIOS-s, one random slot per image. proj_hidden_dim,
        proj_output_dim, pred_hidden_dim: head widths. num_classes: the online probe (0: none).
        simsiam_*: SimSiam's optional terms, each a symmetrised pair added to the per-slot mean.
        gather_negatives: SimCLR negatives from every rank. batch_slots: the N masked views as ONE
        batch with per-slot BatchNorm statistics (same gradients as one call per slot, faster); it
        converts the BatchNorm layers of `encoder` IN PLACE to SlotBatchNorm (same state_dict)."""
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        self.method, self.alpha, self.alpha_entropy, self.temperature = method, alpha, alpha_entropy, temperature
        self.single_mask, self.gather_negatives, self.batch_slots = single_mask, gather_negatives, batch_slots
        self.simsiam_terms = dict(masked_targets=simsiam_masked_targets, unmasked=simsiam_unmasked,
                                  both_masked=simsiam_both_masked)
        projector, predictor = heads(method, feat_dim, proj_hidden_dim, proj_output_dim, pred_hidden_dim)
        classifier = nn.Linear(feat_dim, num_classes) if num_classes else None
        self.net = InferenceModel(encoder, projector, predictor, classifier)     # f_θ
        self.masker = masker                                                     # M_φ
        if batch_slots:
            convert_to_slot_batchnorm(self.net)          # in place: the caller's encoder is converted too
        # BYOL's target network: an EMA of encoder + projector, never trained by gradients.
        self.target = InferenceModel(copy.deepcopy(self.net.encoder), copy.deepcopy(projector)).requires_grad_(False) \
            if method == "byol" else None
        # What each objective calls: the modules, or their DDP wrappers once `distribute` has run. The
        # wrappers sit in a plain dict, not as submodules: registered, they would add a second copy of
        # every weight under "module." names to state_dict() and parameters(), so checkpoints written by
        # one process and by many would differ and the optimisers would see each weight twice.
        self.__dict__["players"] = {"net": self.net, "masker": self.masker}

    # ---- the two objectives (Sec. 2) ------------------------------------------------------------

    def encoder_loss(self, x_a, x_b, labels=None):
        """f_θ's objective: Σ_n L_ssl with the masks held constant, plus the online probe's cross-entropy
        (labels (B,), −1 = unlabelled, or None). x_a, x_b: (B, 3, H, W). Returns (loss, stats)."""
        f, M = self.player("net", trains=True), self.player("masker", trains=False)
        with torch.no_grad():                                 # stop-gradient: the masks are constants for θ
            m_a, m_b = self.masks_for(M, x_a, x_b)            # (B, N, H, W) each, or None
        clean = self.encode_clean(f, x_a, x_b, labels)       # the clean view(s), encoded once
        ssl = sum(self.slot_losses(f, clean, x_a, x_b, m_a, m_b))          # Σ_n L_ssl (Sec. 2)
        ce, probe_stats = probe_loss(clean["logits"], labels)
        with torch.no_grad():                                 # for the log only
            penalty = self.penalty(m_a, m_b)
        return ssl + ce, self.stats(ssl, penalty, m_a, m_b, probe_stats)

    def masker_loss(self, x_a, x_b):
        """M_φ's objective: −Σ_n L_ssl + α·P, through a frozen f_θ (+ α₂·H, the entropy of the slot areas,
        in two released runs: README "Recipes"). x_a, x_b: (B, 3, H, W). Returns (loss, stats)."""
        f, M = self.player("net", trains=False), self.player("masker", trains=True)
        with frozen(self.net):                                # f_θ frozen: the gradient passes through to the masks
            with torch.no_grad():                             # the clean view does not depend on the masks
                clean = self.encode_clean(f, x_a, x_b)
            m_a, m_b = self.masks_for(M, x_a, x_b)            # (B, N, H, W) each
            ssl = sum(self.slot_losses(f, clean, x_a, x_b, m_a, m_b))      # Σ_n L_ssl (Sec. 2)
        penalty = self.penalty(m_a, m_b)                      # P, Eq. (3) (Sec. 2.3)
        loss = -ssl + self.alpha * penalty
        if self.alpha_entropy:
            loss = loss + self.alpha_entropy * self.slot_entropy(m_a, m_b)
        return loss, self.stats(ssl, penalty, m_a, m_b)

    # ---- what the objectives are made of ------------------------------------------------------------

    def player(self, name, trains):
        """The module an objective calls: its DDP wrapper when this step trains it; the module itself
        when it is frozen or under no_grad (a DDP wrapper would wait for gradients that never come)."""
        if self.masker is None and name == "masker":
            if trains:
                raise RuntimeError("masker_loss needs a masker: with masker=None (N = 0) there is no mask step")
            return None
        return self.players[name] if trains else getattr(self, name)

    def masks_for(self, masker, x_a, x_b):
        """(masks of view a or None, masks of view b or None), each (B, N, H, W).

        SimCLR and BYOL mask view b only; SimSiam masks both views, each from its own image
        (one masker call on the stacked views: GroupNorm and the MLP treat images independently).
        """
        if masker is None:
            return None, None
        if self.method != "simsiam":
            return None, masker(x_b)
        m_a, m_b = masker(torch.cat([x_a, x_b])).chunk(2)    # (2B, N, H, W) → 2 × (B, N, H, W)
        return m_a, m_b

    def encode_clean(self, net, x_a, x_b, labels=None):
        """What does not depend on the masks, encoded once per step (the released code: once per slot).

        Returns a dict of the clean views' outputs the slot losses need, and the probe's logits.
        """
        a = net(x_a, classify=labels is not None and self.classifier is not None)
        clean = {"z_a": a.z, "p_a": a.p, "logits": a.logits}
        if self.method == "byol":
            with torch.no_grad():                             # target branch: no gradient, ever
                clean["t_a"] = self.target(x_a).z
        if self.method == "simsiam":
            b = net(x_b)
            clean["z_b"], clean["p_b"] = b.z, b.p
        return clean

    def slot_losses(self, net, clean, x_a, x_b, m_a, m_b):
        """L_ssl of every slot n: the terms of Σ_n (ADIOS-s: one term, a random slot per image; SimSiam
        hides that same slot index in both views, as the released ADIOS-s SimSiam run does)."""
        pick = random_slots(m_b) if self.single_mask and m_b is not None else None    # (B,) or None
        hides_b = slots_to_hide(m_b, self.single_mask, pick)
        hides_a = slots_to_hide(m_a, self.single_mask, pick) if m_a is not None else [None] * len(hides_b)
        return [self.slot_loss(clean, masked) for masked in self.encode_masked(net, x_a, x_b, hides_a, hides_b)]

    def encode_masked(self, net, x_a, x_b, hides_a, hides_b):
        """Outputs of every slot's masked view(s): a list with one dict per slot.

        Names: a view is `a` or `b`, its masked form `am` or `bm`; `z` a projection, `p` a prediction,
        `t` the BYOL target's projection. SimCLR/BYOL mask view b (z_bm; BYOL p_bm and t_bm); SimSiam
        both views (z_am, p_am, z_bm, p_bm). With batch_slots the masked images of all slots go through
        f_θ as one batch whose BatchNorm layers normalise each slot with its own statistics
        (SlotBatchNorm), which is the per-slot loop's arithmetic in one call; without, one call per slot.
        """
        views = [occlude(x_b, h) for h in hides_b]
        if self.method == "simsiam":
            if hides_a[0] is None:                            # no masks: the "masked" views are the clean ones
                return [{}]
            views += [occlude(x_a, h) for h in hides_a]
        outs = self.run_views(net, views)                     # one Outputs per view
        num_slots = len(hides_b)                              # slots in the loss: N, or 1 with ADIOS-s
        if self.method == "simclr":
            return [dict(z_bm=o.z) for o in outs]
        if self.method == "byol":
            with torch.no_grad():                             # target branch: no gradient, ever
                targets = self.run_views(self.target, views)
            return [dict(p_bm=o.p, t_bm=t.z) for o, t in zip(outs, targets)]
        return [dict(z_bm=b.z, p_bm=b.p, z_am=a.z, p_am=a.p)
                for b, a in zip(outs[:num_slots], outs[num_slots:])]

    def run_views(self, net, views):
        """net on each (B, 3, H, W) view: one call per view, or one call on all of them stacked."""
        if not self.batch_slots or len(views) == 1:
            return [net(v) for v in views]
        num_views = len(views)                                # N (2N for SimSiam; 1 or 2 with ADIOS-s)
        with slot_statistics(getattr(net, "module", net), num_views):      # the module inside a DDP wrapper
            out = net(torch.cat(views))                       # (num_views·B, 3, H, W) → Outputs of num_views·B rows
        parts = [t.chunk(num_views) if t is not None else [None] * num_views for t in out]
        return [Outputs(*fields) for fields in zip(*parts)]

    def slot_loss(self, clean, masked):
        """L_ssl for one slot, from the clean outputs and that slot's masked outputs (names: encode_masked)."""
        if self.method == "simclr":
            return simclr_loss(clean["z_a"], masked["z_bm"], self.temperature, self.gather_negatives)
        if self.method == "byol":                             # the masked view through both branches
            return byol_loss(clean["p_a"], masked["t_bm"]) + byol_loss(masked["p_bm"], clean["t_a"])
        c, use = clean, self.simsiam_terms
        z_a, p_a, z_b, p_b = c["z_a"], c["p_a"], c["z_b"], c["p_b"]
        z_am, p_am = masked.get("z_am", z_a), masked.get("p_am", p_a)     # N = 0: no masks, the clean views
        z_bm, p_bm = masked.get("z_bm", z_b), masked.get("p_bm", p_b)
        terms = [symmetric_simsiam(p_am, z_b, p_bm, z_a)]      # always: masked p vs clean z
        if use["masked_targets"]:
            terms.append(symmetric_simsiam(p_a, z_bm, p_b, z_am))
        if use["unmasked"]:
            terms.append(symmetric_simsiam(p_a, z_b, p_b, z_a))
        if use["both_masked"]:
            terms.append(symmetric_simsiam(p_am, z_bm, p_bm, z_am))
        return sum(terms) / len(terms)

    def penalty(self, m_a, m_b):
        """Sparsity penalty over every mask this step uses (both views' for SimSiam); 0 without."""
        return sum(sparsity_penalty(m) for m in (m_a, m_b) if m is not None)

    def slot_entropy(self, m_a, m_b):
        """H of the slot areas. SimSiam: one distribution per image over both views' 2N areas; with
        ADIOS-s, one H per view (as the released runs)."""
        areas = [slot_areas(m) for m in (m_a, m_b) if m is not None]          # (B, N) each
        if self.single_mask:
            return sum(area_entropy(a) for a in areas)
        return area_entropy(torch.cat(areas, dim=1))

    def stats(self, ssl, penalty, m_a, m_b, extra=()):
        """Detached 0-d float tensors for the log, left on the device (train.py reads them every
        --log_every steps, not every step): the SSL sum, the penalty, and per slot n the mean mask area
        over the batch (area_n) with its min and max (area_n_min/max)."""
        device = ssl.device
        stats = dict(ssl_loss=ssl.detach().float(), penalty=torch.as_tensor(penalty, device=device).detach().float())
        masks = [m for m in (m_a, m_b) if m is not None]
        if masks:
            area = torch.cat(masks).detach().float().mean(dim=(2, 3))       # (B or 2B, N)
            lo, hi = area.aminmax(dim=0)                                    # (N,) each
            for n, (mean, low, high) in enumerate(zip(area.mean(dim=0), lo, hi)):
                stats.update({f"area_{n}": mean, f"area_{n}_min": low, f"area_{n}_max": high})
        for name, value in extra:
            stats[name] = torch.as_tensor(value, device=device).detach().float()
        return stats

    # ---- BYOL's target, and several processes --------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self, tau):
        """BYOL's EMA: target ← τ·target + (1 − τ)·online, for encoder and projector weights."""
        online = list(self.net.encoder.parameters()) + list(self.net.projector.parameters())
        for t, o in zip(self.target.parameters(), online):
            t.lerp_(o, 1 - tau)                               # t + (1 − τ)(o − t)


    def distribute(self, device_ids=None, sync_batchnorm=False):
        """Give f_θ and M_φ each their own DistributedDataParallel wrapper (call under torchrun).

        The encoder step differentiates through the wrapped f_θ only (masks under no_grad); the
        masker step through the wrapped M_φ only (f_θ frozen and called unwrapped), so each
        wrapper sees all its parameters used in every backward. sync_batchnorm: BatchNorm statistics
        over the global batch, still per slot (encoders.SlotSyncBatchNorm; gloo or NCCL).
        """
        if sync_batchnorm:
            for module in (self.net, self.target):
                if module is not None:
                    convert_to_slot_batchnorm(module, sync=True)
        # No buffer broadcast before each forward: BatchNorm statistics stay per rank (or are synced by
        # SlotSyncBatchNorm). torch ≥ 2.13 names the switch forward_sync_buffers, older ones broadcast_buffers.
        DDP = nn.parallel.DistributedDataParallel
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        ddp = lambda m: DDP(m, device_ids=device_ids, **{quiet: False})
        self.players["net"] = ddp(self.net)
        if self.masker is not None and any(p.requires_grad for p in self.masker.parameters()):
            self.players["masker"] = ddp(self.masker)         # fixed (random/block) maskers need none
        if self.target is not None:                           # start every rank's target from rank 0's
            for t in self.target.state_dict().values():
                dist.broadcast(t, 0)

    # The names users and checkpoints rely on.
    encoder = property(lambda self: self.net.encoder)
    projector = property(lambda self: self.net.projector)
    predictor = property(lambda self: self.net.predictor)
    classifier = property(lambda self: self.net.classifier)
    num_masks = property(lambda self: 0 if self.masker is None else self.masker.num_masks)


# ---- the inference model f_θ -------------------------------------------------------------------

# f_θ's outputs: features h (B, feat_dim), projection z (B, out), prediction p (B, out) or None, logits or None.
Outputs = namedtuple("Outputs", "h z p logits")


class InferenceModel(nn.Module):
    """f_θ: backbone → projector (→ predictor), plus the online linear probe on detached features.
    One module, so that train.py can give it a single DistributedDataParallel wrapper."""

    def __init__(self, encoder, projector, predictor=None, classifier=None):
        super().__init__()
        self.encoder, self.projector, self.predictor, self.classifier = encoder, projector, predictor, classifier

    def forward(self, x, classify=False):
        h = self.encoder(x)                                   # (B, feat_dim)
        z = self.projector(h)                                 # (B, out)
        p = self.predictor(z) if self.predictor is not None else None
        # The probe sees detached features: it learns from the encoder, never changes it.
        logits = self.classifier(h.detach()) if classify else None
        return Outputs(h, z, p, logits)


def heads(method, feat_dim, proj_hidden_dim, proj_output_dim, pred_hidden_dim):
    """(projector, predictor or None) of the base method, with the released runs' layer layouts."""
    if method == "simclr":
        return simclr_projector(feat_dim, proj_hidden_dim, proj_output_dim), None
    if method == "byol":
        return (byol_mlp(feat_dim, proj_hidden_dim, proj_output_dim),
                byol_mlp(proj_output_dim, pred_hidden_dim or proj_hidden_dim, proj_output_dim))
    return (simsiam_projector(feat_dim, proj_hidden_dim, proj_output_dim),
            simsiam_predictor(proj_output_dim, pred_hidden_dim or 512))


# ---- masks ---------------------------------------------------------------------------------------

def occlude(x, hide):
    """The masked view x ⊙ (1 − m) (Sec. 2): x (B, 3, H, W) normalised, hide (B, 1, H, W).

    Hidden pixels become 0, the dataset's mean colour after normalisation. hide=None: no mask.
    """
    return x if hide is None else x * (1 - hide)


def slots_to_hide(masks, single_mask, pick=None):
    """The masks the SSL loss is summed over: a list of (B, 1, H, W), or [None] without a masker.

    ADIOS: all N slots. ADIOS-s (the paper's lightweight variant): one slot per image, so the SSL loss
    is computed once instead of N times: slot pick[b] of image b (pick (B,); default: drawn uniformly at
    random afresh on every call, random_slots).
    """
    if masks is None:
        return [None]
    B, N = masks.shape[:2]
    if single_mask:
        pick = random_slots(masks) if pick is None else pick                # (B,)
        return [masks[torch.arange(B, device=masks.device), pick].unsqueeze(1)]
    return [masks[:, n:n + 1] for n in range(N)]


def random_slots(masks):
    """ADIOS-s: one slot index per image, uniform over the N slots of masks (B, N, H, W) → (B,)."""
    return torch.randint(masks.shape[1], (masks.shape[0],), device=masks.device)


def slot_areas(masks):
    """a_bn, the share of image b that slot n covers: (B, N, H, W) → (B, N) in [0, 1], at least float32,
    computed outside autocast (half precision would round the small areas the penalty cares about)."""
    dtype = torch.promote_types(masks.dtype, torch.float32)   # half → float32; float64 stays
    with torch.autocast(masks.device.type, enabled=False):
        return masks.to(dtype).mean(dim=(2, 3)).clamp(0, 1)


def sparsity_penalty(masks):
    """ADIOS Eq. (3), Sec. 2.3: P = Σ_n mean_b 1 / (sin(π · a_bn) + 1e-10), a_bn = area of slot n.

    masks: (B, N, H, W) soft masks. Returns a scalar, ≥ 1 per slot, smallest when a slot covers half
    the image, huge when it is empty or covers all. sin(π·a) is evaluated as sin(π·min(a, 1 − a)),
    equal in exact arithmetic: it keeps the argument in [0, π/2], where sin is never negative
    (float32's π exceeds π, so sin(π·1.0) < 0 would flip the penalty's sign for a full slot).
    """
    area = slot_areas(masks)                                  # (B, N)
    with torch.autocast(masks.device.type, enabled=False):
        half_turn = torch.minimum(area, 1 - area)
        return (1 / (torch.sin(math.pi * half_turn) + 1e-10)).mean(dim=0).sum()


def area_entropy(areas):
    """H = −Σ_b Σ_n p_bn log p_bn with p_b = softmax_n(a_b): the entropy of each image's slot areas,
    SUMMED over the batch (the penalty is a batch mean). areas: (B, N). The released code's α₂ term:
    its masker maximises α₂·Σ p log p, so it minimises +α₂·H, pushing towards slots of unequal size."""
    with torch.autocast(areas.device.type, enabled=False):
        return -(F.softmax(areas, dim=1) * F.log_softmax(areas, dim=1)).sum()


@contextlib.contextmanager
def frozen(module):
    """No parameter of `module` requires grad inside the block; the flags are restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ---- the base methods' losses (Sec. 4 of the paper uses SimCLR, BYOL and SimSiam) ------------------

def simclr_loss(z1, z2, temperature=0.2, gather=True):
    """NT-Xent (SimCLR, Chen et al. 2020, Eq. 1): mean over the 2B anchors of this rank.

    z1, z2: (B, D) embeddings of two views; row i of z1 and row i of z2 are the positive pair.
    gather=True (the default) uses every rank's embeddings as negatives through GatherWithGrad, so
    K processes with batch B each compute the loss of one process with batch K·B (the released code
    used the local batch only); with one process it changes nothing.
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)     # logits in at least float32
    z1, z2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)
    B = z1.shape[0]
    rank, world = distributed_world() if gather else (0, 1)
    all1, all2 = (GatherWithGrad.apply(z1), GatherWithGrad.apply(z2)) if world > 1 else (z1, z2)
    anchors = torch.cat([z1, z2])                             # (2B, D)
    candidates = torch.cat([all1, all2])                      # (2WB, D)
    logits = anchors @ candidates.T / temperature             # (2B, 2WB)
    mine = torch.arange(B, device=z1.device) + rank * B       # this rank's rows within all1/all2
    self_idx = torch.cat([mine, mine + world * B])            # (2B,) each anchor's own column
    pos_idx = torch.cat([mine + world * B, mine])             # (2B,) the other view of the same image
    is_self = F.one_hot(self_idx, logits.shape[1]).bool()
    logits = logits.masked_fill(is_self, float("-inf"))       # an embedding is not its own negative
    return F.cross_entropy(logits, pos_idx)


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


def probe_loss(logits, labels):
    """(cross-entropy, [(name, value)]: CE and top-1 in % for the log) of the online probe over labelled
    images (label −1 is skipped), without a host sync; (0, []) without a probe."""
    if logits is None:
        return 0, []
    labelled = labels >= 0
    count = labelled.sum().clamp(min=1)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    acc = (logits.argmax(dim=1) == labels) & labelled
    ce = (ce * labelled).sum() / count
    return ce, [("online_ce", ce), ("online_acc", 100 * acc.sum() / count)]        # accuracy in %


# ---- collectives ---------------------------------------------------------------------------------

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
