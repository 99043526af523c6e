"""ADIOS as the authors ran it: the released training step, one forward pass at a time. Read this first.

One iteration (Sec. 2): the encoder step sums L_ssl over the N slots, encoding for every slot n the clean
view(s) again and then the masked view(s) x ⊙ (1 − m_n), with the masks held constant; the online probe
then encodes both crops once more. The masker step repeats the slot loop through the frozen encoder and
adds α·P. adios.py computes the same gradients, and (with batchnorm.as_released) leaves the same BatchNorm
running statistics, with fewer and larger passes: test_adios.py and tests/test_batchnorm_state.py check it on
float64, bench.py times the two. Works on any adios.ADIOS (its BatchNorm layers may be torch's own).
README: "Reading guide".
"""
import torch

from adios import frozen, occlude, probe_loss, sparsity_penalty
from losses import byol_loss, simclr_loss, symmetric_simsiam


def iteration(model, x_a, x_b, labels, opt_enc, opt_mask, target_pick="masker"):
    """One released iteration on views x_a, x_b (B, 3, H, W): the encoder step, then the masker step (ADIOS-s
    draws its slot per image afresh for each). BYOL's EMA follows in the caller, as in train.py.
    target_pick: the draw BYOL's target encodes in the masker step, "masker" (that step's own, as released)
    or "encoder" (the encoder step's: adios.py's one departure, README "BatchNorm state")."""
    pick = draw_slot(model, x_b)                              # ADIOS-s: (B,) slot indices; else None
    loss = encoder_loss(model, x_a, x_b, labels, pick)
    opt_enc.zero_grad(set_to_none=True)
    loss.backward()
    opt_enc.step()
    if opt_mask is not None:
        masker_pick = draw_slot(model, x_b)
        loss = masker_loss(model, x_a, x_b, masker_pick, pick if target_pick == "encoder" else masker_pick)
        opt_mask.zero_grad(set_to_none=True)
        loss.backward()
        opt_mask.step()


def encoder_loss(model, x_a, x_b, labels=None, pick=None):
    """Σ_n L_ssl with the masks as constants, one slot at a time, plus the probe's CE (its own pass).
    pick: ADIOS-s's slot per image (B,), or None for every slot."""
    if model.masker is None:                                  # N = 0: the base method, one pass per view
        return base_loss(model, x_a, x_b, labels)
    with torch.no_grad():                                     # stop-gradient: the masks are constants for θ
        m_a, m_b = masks(model, x_a, x_b)                     # (B, N, H, W) each (m_a: SimSiam only)
    ssl = sum(slot_loss(model, x_a, x_b, h_a, h_b) for h_a, h_b in hides(m_a, m_b, pick))   # Σ_n L_ssl
    return ssl + probe_pass(model, x_a, x_b, labels)


def masker_loss(model, x_a, x_b, pick=None, target_pick=None):
    """−Σ_n L_ssl + α·P (+ α₂·H) through the frozen f_θ: the same slot loop, the gradient reaching the masks.
    pick: as encoder_loss; target_pick: the slots BYOL's target encodes (default: pick)."""
    with frozen(model.net):
        m_a, m_b = masks(model, x_a, x_b)
        targets = [h for _, h in hides(None, m_b.detach(), pick if target_pick is None else target_pick)]
        ssl = sum(slot_loss(model, x_a, x_b, h_a, h_b, t_b) for (h_a, h_b), t_b in zip(hides(m_a, m_b, pick), targets))
    penalty = sparsity_penalty(m_b) + (sparsity_penalty(m_a) if m_a is not None else 0)    # Eq. (3), Sec. 2.3
    return -ssl + model.alpha * penalty + model.alpha_entropy * model.slot_entropy(m_a, m_b)


def slot_loss(model, x_a, x_b, hide_a, hide_b, target_hide=None):
    """L_ssl of one slot, the clean view(s) encoded again: hide_a, hide_b (B, 1, H, W) the slot's masks
    (hide_a: SimSiam only; None: no mask). target_hide: BYOL's target's mask (default hide_b)."""
    enc, proj, pred = model.net.encoder, model.net.projector, model.net.predictor
    x_bm = occlude(x_b, hide_b)
    if model.method == "simclr":
        return simclr_loss(proj(enc(x_a)), proj(enc(x_bm)), model.temperature, model.gather_negatives)
    if model.method == "byol":                                # the masked view through both branches
        with torch.no_grad():                                 # the target: no gradient, ever
            t = model.target
            t_a, t_bm = (t.projector(t.encoder(x)) for x in (x_a, occlude(x_b, hide_b if target_hide is None else target_hide)))
        p_a, p_bm = (pred(proj(enc(x))) for x in (x_a, x_bm))
        return byol_loss(p_a, t_bm) + byol_loss(p_bm, t_a)
    z_a, z_b = proj(enc(x_a)), proj(enc(x_b))                 # SimSiam: both clean views, then both masked
    p_a, p_b = pred(z_a), pred(z_b)
    if hide_b is None:                                        # no masks: the plain symmetric pair
        return symmetric_simsiam(p_a, z_b, p_b, z_a)
    z_am, z_bm = proj(enc(occlude(x_a, hide_a))), proj(enc(x_bm))
    p_am, p_bm = pred(z_am), pred(z_bm)
    use = model.simsiam_terms
    terms = [symmetric_simsiam(p_am, z_b, p_bm, z_a)]         # always: masked p vs clean z
    if use["masked_targets"]:
        terms.append(symmetric_simsiam(p_a, z_bm, p_b, z_am))
    if use["unmasked"]:
        terms.append(symmetric_simsiam(p_a, z_b, p_b, z_a))
    if use["both_masked"]:
        terms.append(symmetric_simsiam(p_am, z_bm, p_bm, z_am))
    return sum(terms) / len(terms)                            # the mean of the included terms


def probe_pass(model, x_a, x_b, labels):
    """The online probe's own pass (the released base step): the backbone on each crop, the probe on the
    detached features, the mean of the two crops' CE; BYOL's target backbone encodes both crops too."""
    feats = [model.net.encoder(x) for x in (x_a, x_b)]        # 2 × (B, feat_dim)
    if model.method == "byol":
        with torch.no_grad():
            model.target.encoder(x_a), model.target.encoder(x_b)   # unused but for BatchNorm's statistics
    if labels is None or model.classifier is None:
        return 0
    logits = torch.cat([model.classifier(h.detach()) for h in feats])   # (2B, classes)
    return probe_loss(logits, labels.repeat(2))[0]


def base_loss(model, x_a, x_b, labels):
    """N = 0, the base method: each view encoded once, the probe on the same features."""
    net = model.net
    h_a, h_b = net.encoder(x_a), net.encoder(x_b)             # (B, feat_dim) each
    z_a, z_b = net.projector(h_a), net.projector(h_b)
    if model.method == "simclr":
        ssl = simclr_loss(z_a, z_b, model.temperature, model.gather_negatives)
    elif model.method == "byol":
        with torch.no_grad():
            t_a, t_b = (model.target.projector(model.target.encoder(x)) for x in (x_a, x_b))
        ssl = byol_loss(net.predictor(z_a), t_b) + byol_loss(net.predictor(z_b), t_a)
    else:
        ssl = symmetric_simsiam(net.predictor(z_a), z_b, net.predictor(z_b), z_a)
    if labels is None or net.classifier is None:
        return ssl
    logits = torch.cat([net.classifier(h.detach()) for h in (h_a, h_b)])   # (2B, classes)
    return ssl + probe_loss(logits, labels.repeat(2))[0]


def masks(model, x_a, x_b):
    """(masks of view a or None, masks of view b), (B, N, H, W): SimSiam masks each view separately."""
    return (model.masker(x_a) if model.method == "simsiam" else None), model.masker(x_b)


def draw_slot(model, x):
    """ADIOS-s: one slot index per image of x (B, 3, H, W), uniform over the N slots, (B,); None for ADIOS."""
    return torch.randint(model.num_masks, (x.shape[0],), device=x.device) if model.single_mask else None


def hides(m_a, m_b, pick):
    """The slot loop's masks: a list of (hide_a, hide_b) pairs, each (B, 1, H, W), one per slot (ADIOS-s:
    the picked slot of each image, the same index in both views); hide_a None without masks of view a."""
    def slots(m):
        if pick is not None:
            return [m[torch.arange(m.shape[0], device=m.device), pick].unsqueeze(1)]
        return [m[:, n:n + 1] for n in range(m.shape[1])]
    slots_b = slots(m_b)
    return list(zip(slots(m_a) if m_a is not None else [None] * len(slots_b), slots_b))
