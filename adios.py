"""ADIOS (Shi, Siddharth, Torr, Kosiorek, "Adversarial Masking for Self-Supervised Learning", ICML 2022).

The two objectives of Sec. 2 come first in `ADIOS`: f_θ minimises Σ_n L_ssl(f(x_a), f(x_b ⊙ (1 − m_n)))
over the N masks m = M_φ(x_b); M_φ (masker.py) maximises that sum minus α·P. What they are made of
follows: the masks, ADIOS-s, the penalty P, α₂, the online probe. Needs torch, encoders.py (f_θ),
losses.py (L_ssl) and batchnorm.py (per-slot BatchNorm for the batched slots). README: "Reading guide".
"""
import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchnorm import convert_to_slot_batchnorm, slot_statistics
from encoders import InferenceModel, Outputs, heads
from losses import byol_loss, distributed_world, normalised_and_gathered, simclr_loss, symmetric_simsiam

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
        batch with per-slot BatchNorm statistics (same gradients as one call per slot, faster).
        The BatchNorm layers of `encoder` are converted IN PLACE to SlotBatchNorm (same state_dict;
        batchnorm.py, README "BatchNorm state")."""
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
        convert_to_slot_batchnorm(self.net)              # in place: the caller's encoder is converted too
        # BYOL's target network: an EMA of encoder + projector, never trained by gradients.
        self.target = InferenceModel(copy.deepcopy(self.net.encoder), copy.deepcopy(projector)).requires_grad_(False) \
            if method == "byol" else None
        # Under torchrun, run_setup.distribute puts f_θ's and M_φ's DDP wrappers here ("net", "masker"). A
        # plain dict, not submodules: registered, they would add a second copy of every weight to state_dict().
        self.ddp = {}

    # ---- the two objectives (Sec. 2) ------------------------------------------------------------

    def encoder_loss(self, x_a, x_b, labels=None):
        """f_θ's objective: Σ_n L_ssl with the masks held constant, plus the online probe's cross-entropy
        (labels (B,), −1 = unlabelled, or None). x_a, x_b: (B, 3, H, W). Returns (loss, stats)."""
        f = self.ddp.get("net", self.net)                     # f_θ trains: its DDP wrapper under torchrun
        with torch.no_grad():                                 # stop-gradient: the masks are constants for θ
            m_a, m_b = self.masks_for(self.masker, x_a, x_b)  # (B, N, H, W) each, or None
        clean = self.encode_clean(f, x_a, x_b, labels)        # the clean views, encoded once
        ssl = sum(self.slot_losses(f, clean, x_a, x_b, m_a, m_b))   # Σ_n L_ssl (Sec. 2)
        ce, probe_stats = probe_loss(clean["logits"], clean["labels"])   # the probe: mean over both crops
        with torch.no_grad():                                 # for the log only
            penalty = self.penalty(m_a, m_b)
        return ssl + ce, self.stats(ssl, penalty, m_a, m_b, probe_stats)

    def masker_loss(self, x_a, x_b):
        """M_φ's objective: −Σ_n L_ssl + α·P, through a frozen f_θ (+ α₂·H, the entropy of the slot areas,
        in two released runs: README "Recipes"). x_a, x_b: (B, 3, H, W). Returns (loss, stats). BYOL's
        L_ssl here leaves out its term 2 − 2·cos(p_a, t_bm), constant in φ (the target is never trained)."""
        if self.masker is None:
            raise RuntimeError("masker_loss needs a masker: with masker=None (N = 0) there is no mask step")
        M = self.ddp.get("masker", self.masker)               # M_φ trains: its DDP wrapper under torchrun
        f = self.net                                          # frozen, so unwrapped: DDP would wait for gradients
        with frozen(f):                                       # the gradient passes through f_θ to the masks
            with torch.no_grad():                             # the clean views do not depend on the masks
                clean = self.encode_clean(f, x_a, x_b, step="masker")
            m_a, m_b = self.masks_for(M, x_a, x_b)            # (B, N, H, W) each
            ssl = sum(self.slot_losses(f, clean, x_a, x_b, m_a, m_b, step="masker"))   # Σ_n L_ssl (Sec. 2)
        penalty = self.penalty(m_a, m_b)                      # P, Eq. (3) (Sec. 2.3)
        loss = -ssl + self.alpha * penalty
        if self.alpha_entropy:
            # α₂·H with H summed over the batch, as released (one GPU). DDP averages the W processes' gradients,
            # so each weighs its own images' sum by W: together they train with the global batch's sum.
            loss = loss + self.alpha_entropy * distributed_world()[1] * self.slot_entropy(m_a, m_b)
        return loss, self.stats(ssl, penalty, m_a, m_b)

    # ---- what the objectives are made of ------------------------------------------------------------

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

    def encode_clean(self, net, x_a, x_b, labels=None, step="encoder"):
        """What does not depend on the masks, encoded once per step (the released code: once per slot).

        Returns a dict of the clean views' outputs the slot losses need (names: encode_masked), and the
        online probe's logits on both crops with their labels (2B rows; None without a probe). SimSiam,
        and every method at N = 0, needs both views' projections: one stacked call. SimCLR and BYOL need
        view a's; view b goes through the backbone for the probe alone in the encoder step, as released.
        """
        classify = step == "encoder" and labels is not None and self.classifier is not None
        clean = {"logits": None, "labels": labels.repeat(2) if classify else None}
        if self.method == "simsiam" or self.masker is None:
            a, b = self.run_views(net, [x_a, x_b], ["a", "b"], classify=classify)
            clean.update(z_b=b.z, p_b=b.p)
        else:
            (a,) = self.run_views(net, [x_a], ["a"], classify=classify)
            b = self.run_views(net, [x_b], ["b"], probe_only=True)[0] if step == "encoder" else None
        clean.update(z_a=a.z, p_a=a.p)
        if classify:
            clean["logits"] = torch.cat([a.logits, b.logits])                # (2B, classes)
        if self.method == "simclr":                           # the clean side of NT-Xent, gathered once per step
            clean["z_a_all"] = normalised_and_gathered(a.z, self.gather_negatives)
        if self.method == "byol":
            with torch.no_grad():                             # target branch: no gradient, ever
                views, names = ([x_a, x_b], ["a", "b"]) if step == "encoder" else ([x_a], ["a"])
                t = self.run_views(self.target, views, names)
            clean.update(t_a=t[0].z, t_b=t[-1].z if step == "encoder" else None)
        return clean

    def slot_losses(self, net, clean, x_a, x_b, m_a, m_b, step="encoder"):
        """L_ssl of every slot n: the terms of Σ_n (ADIOS-s: one term, a random slot per image; SimSiam
        hides that same slot index in both views, as the released ADIOS-s SimSiam run does)."""
        pick = random_slots(m_b) if self.single_mask and m_b is not None else None    # (B,) or None
        hides_b = slots_to_hide(m_b, self.single_mask, pick)
        hides_a = slots_to_hide(m_a, self.single_mask, pick) if m_a is not None else [None] * len(hides_b)
        masked = self.encode_masked(net, x_a, x_b, hides_a, hides_b, step)
        return [self.slot_loss(clean, m) for m in masked]

    def encode_masked(self, net, x_a, x_b, hides_a, hides_b, step="encoder"):
        """Outputs of every slot's masked view(s): a list with one dict per slot ([{}] without masks).

        Names: a view is `a` or `b`, its masked form `am` or `bm`; `z` a projection, `p` a prediction,
        `t` the BYOL target's projection. SimCLR/BYOL mask view b (z_bm; BYOL p_bm, and t_bm in the
        encoder step only: in the masker step its term is constant in φ); SimSiam both views (z_am, p_am,
        z_bm, p_bm). With batch_slots the masked images of all slots go through f_θ as one batch whose
        BatchNorm layers normalise each slot with its own statistics (SlotBatchNorm), which is the
        per-slot loop's arithmetic in one call; without, one call per slot.
        """
        if hides_b[0] is None:                                # no masks: the "masked" views are the clean ones
            return [{}]
        num_slots = len(hides_b)                              # slots in the loss: N, or 1 with ADIOS-s
        views, names = [occlude(x_b, h) for h in hides_b], [f"bm{n}" for n in range(num_slots)]
        if self.method == "simsiam":
            views += [occlude(x_a, h) for h in hides_a]
            names += [f"am{n}" for n in range(num_slots)]
        outs = self.run_views(net, views, names)              # one Outputs per view
        if self.method == "simclr":
            return [dict(z_bm=o.z) for o in outs]
        if self.method == "byol":
            if step != "encoder":
                return [dict(p_bm=o.p) for o in outs]
            with torch.no_grad():                             # target branch: no gradient, ever
                targets = self.run_views(self.target, views, names)
            return [dict(p_bm=o.p, t_bm=t.z) for o, t in zip(outs, targets)]
        return [dict(z_bm=b.z, p_bm=b.p, z_am=a.z, p_am=a.p)
                for b, a in zip(outs[:num_slots], outs[num_slots:])]

    def run_views(self, net, views, names, classify=False, probe_only=False):
        """net on each (B, 3, H, W) view, named for the BatchNorm statistics (`a`, `b`, `bm0`, ...): one
        call per view, or one call on all of them stacked. Returns one Outputs per view."""
        module = getattr(net, "module", net)                  # the module inside a DDP wrapper
        if not self.batch_slots or len(views) == 1:
            outs = []
            for view, name in zip(views, names):
                with slot_statistics(module, [name]):
                    outs.append(net(view, classify=classify, probe_only=probe_only))
            return outs
        num_views = len(views)                                # N (2N for SimSiam; 1 or 2 with ADIOS-s)
        with slot_statistics(module, names):
            out = net(torch.cat(views), classify=classify, probe_only=probe_only)   # Outputs of num_views·B rows
        parts = [t.chunk(num_views) if t is not None else [None] * num_views for t in out]
        return [Outputs(*fields) for fields in zip(*parts)]

    def slot_loss(self, clean, masked):
        """L_ssl for one slot, from the clean outputs and that slot's masked outputs (names: encode_masked)."""
        c = clean
        if self.method == "simclr":                           # N = 0: view b itself is the "masked" view
            return simclr_loss(c["z_a"], masked.get("z_bm", c.get("z_b")), self.temperature, self.gather_negatives,
                               z1_all=c["z_a_all"])
        if self.method == "byol":                             # the masked view through both branches
            p_bm, t_bm = (masked["p_bm"], masked.get("t_bm")) if masked else (c["p_b"], c["t_b"])
            loss = byol_loss(p_bm, c["t_a"])
            return loss if t_bm is None else loss + byol_loss(c["p_a"], t_bm)   # None: the masker step
        use = self.simsiam_terms
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

    # ---- BYOL's target ------------------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self, tau):
        """BYOL's EMA: target ← τ·target + (1 − τ)·online, for encoder and projector weights."""
        online = list(self.net.encoder.parameters()) + list(self.net.projector.parameters())
        for t, o in zip(self.target.parameters(), online):
            t.lerp_(o, 1 - tau)                               # t + (1 − τ)(o − t)

    @property
    def has_masker_step(self):
        """Whether M_φ learns (train.py then runs masker_loss after every encoder_loss)."""
        return self.masker is not None and any(p.requires_grad for p in self.masker.parameters())

    # The names users and checkpoints rely on.
    encoder = property(lambda self: self.net.encoder)
    projector = property(lambda self: self.net.projector)
    predictor = property(lambda self: self.net.predictor)
    classifier = property(lambda self: self.net.classifier)
    num_masks = property(lambda self: 0 if self.masker is None else self.masker.num_masks)


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


# ---- the online probe ----------------------------------------------------------------------------

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

