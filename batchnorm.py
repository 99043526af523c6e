"""BatchNorm for ADIOS's batched slots, and its running statistics as the released loop leaves them.

The paper's loop (Sec. 2) encodes every masked view in its own forward pass; adios.py encodes the N views of
a step as one batch. Three pieces keep that exact:
- per-slot BatchNorm (SlotBatchNorm1d/2d): each slot of the stacked batch normalised with its own batch
  statistics, and over many processes with every process's images of that slot (SlotSyncBatchNorm);
- the running statistics as released (as_released, the training loop's one door): each batch's statistics
  filed during the objective, then blended into the running averages in the order, and as many times, as the
  released loop's forward passes would (released_order);
- --precise_bn's recomputation of the running statistics on clean images (precise_batchnorm).
Needs torch alone. README: "BatchNorm state".
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ---- the door: the training loop enters this file here -----------------------------------------

@contextlib.contextmanager
def as_released(model, step):
    """Around one objective of model (an adios.ADIOS; step "encoder" or "masker"): its BatchNorm layers
    normalise as usual but file each named batch's statistics; on leaving the block they are blended into the
    running averages as the released loop's forward passes of that step would move them. An exception in the
    block leaves the running averages as they were."""
    with deferred_statistics(model.net, model.target):
        yield
        num_slots = 0 if model.masker is None else 1 if model.single_mask else model.num_masks
        order = lambda part: released_order(model.method, num_slots, step, part, model.has_masker_step)  # noqa: E731
        apply_statistics([model.net.encoder], order("encoder"))
        apply_statistics([m for m in (model.net.projector, model.net.predictor) if m is not None], order("heads"))
        if model.target is not None and step == "encoder":    # the target's whole iteration (released_order)
            apply_statistics([model.target.encoder], order("target_encoder"))
            apply_statistics([model.target.projector], order("target_heads"))


# ---- the released loop's BatchNorm sequence ------------------------------------------------------

def released_order(method, num_slots, step, part, masker_step=True):
    """The batches one BatchNorm layer of `part` sees, in order, in one step of the released loop.

    Every train-mode forward pass moves a layer's running mean and variance one momentum step, so their
    order and number is part of the state a checkpoint holds. The released training_step runs, encoder
    in train mode, for each slot n the clean view(s) then the masked one(s): a, bm_n (SimCLR, BYOL) or
    a, b, am_n, bm_n (SimSiam); then, in the encoder step only, the online probe's pass of the backbone
    (only) over both crops, a and b; the masker step repeats the slot loop. BYOL's target runs the same
    slot loop in both steps, and the probe's a, b through its backbone. num_slots: N, 1 for ADIOS-s,
    0 for the plain base method, whose networks each see a, b once. part: "encoder" or "heads"
    (projector, predictor) of f_θ, or "target_encoder" / "target_heads". Returns a list of names.

    BYOL's target: its weights change only after the iteration and the masks are the same in both
    steps, so the encoder step moves its statistics for the whole iteration (masker_step: whether one
    follows), and the masker step encodes no masked view through it (ADIOS-s draws its slot again in
    the masker step: there the encoder step's draw stands in; README "BatchNorm state").
    """
    if num_slots == 0:
        return ["a", "b"]
    target = part.startswith("target")
    clean = ["a", "b"] if method == "simsiam" and not target else ["a"]
    masked = lambda n: [f"am{n}", f"bm{n}"] if method == "simsiam" and not target else [f"bm{n}"]  # noqa: E731
    slot_loop = [name for n in range(num_slots) for name in clean + masked(n)]
    probe = ["a", "b"] if part.endswith("encoder") else []
    if not target:
        return slot_loop + probe if step == "encoder" else slot_loop
    if step != "encoder":
        return []
    return slot_loop + probe + (slot_loop if masker_step else [])



# ---- per-slot BatchNorm statistics for batched slots ------------------------------------------

class SlotBatchNormMixin:
    """BatchNorm that can treat its batch as `slots` equal parts, each normalised with its own
    batch statistics: exactly what `slots` separate forward calls in train mode compute.

    The paper's loop encodes each masked view separately, so BatchNorm sees per-slot statistics;
    stacking the slots into one batch lets every other layer run once on S·B images, while
    BatchNorm still runs once per slot (in order, so the running averages match the loop's too).
    Inside `deferred_statistics` the running buffers stay put and each part's statistics are filed
    under its name (`slot_statistics(module, names)`), for `apply_statistics` to blend in later in
    any order and number. With slots == 1, or in eval mode, this is the plain BatchNorm.
    State-dict keys are BatchNorm's.
    """
    slots = 1
    names = None      # one name per part, set by slot_statistics
    batches = None    # {name: (mean, unbiased variance)} while statistics are deferred

    def forward(self, x):                                     # x: (S·B, C, ...)
        deferred = self.batches is not None and self.training and self.track_running_stats
        if not deferred and (self.slots == 1 or not self.training):
            return super().forward(x)
        parts = x.chunk(self.slots) if self.slots > 1 else [x]
        if not deferred:
            return torch.cat([super(SlotBatchNormMixin, self).forward(p) for p in parts])   # slot by slot, in order
        outs, stats = zip(*[self.normalise_keeping_statistics(p) for p in parts])
        self.file_statistics(list(stats))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def normalise_keeping_statistics(self, x):
        """Train-mode BatchNorm of x with the running buffers left alone. Returns (output, (x's batch
        mean, its unbiased variance)): what the running averages would have taken in."""
        stats = torch.zeros_like(self.running_mean), torch.zeros_like(self.running_var)
        # momentum 1: the two zero buffers become exactly the batch's mean and unbiased variance
        return F.batch_norm(x, *stats, self.weight, self.bias, True, 1.0, self.eps), stats

    def file_statistics(self, stats):
        """stats: per part, (mean (C,), unbiased variance (C,)); filed under self.names in order."""
        names = self.names if self.names is not None else [None] * len(stats)
        if None in names or len(names) != len(stats):
            raise RuntimeError("deferred BatchNorm statistics need one name per part: call the module "
                               "inside slot_statistics(module, names)")
        self.batches.update(zip(names, stats))

    @torch.no_grad()
    def blend(self, stats):
        """Move the running mean and variance as len(stats) train-mode calls would, call i taking in
        stats[i] = (mean, unbiased variance): r ← (1 − f_i)·r + f_i·s_i, f_i the momentum (None: 1/calls
        so far, the cumulative average). Done in closed form, r_K = Π(1 − f_i)·r_0 + Σ_i w_i·s_i, the
        weights of one batch seen several times added up: one update per distinct batch."""
        keep, weights, first = 1.0, {}, int(self.num_batches_tracked) if self.momentum is None else 0
        for i in reversed(range(len(stats))):                 # w_i = f_i · Π_{l > i} (1 − f_l)
            f = self.momentum if self.momentum is not None else 1.0 / (first + i + 1)
            mean, var = stats[i]
            key = (id(mean), id(var))
            weights[key] = (mean, var, weights.get(key, (None, None, 0.0))[2] + f * keep)
            keep *= 1 - f
        self.running_mean.mul_(keep)
        self.running_var.mul_(keep)
        for mean, var, w in weights.values():
            self.running_mean.add_(mean.to(self.running_mean.dtype), alpha=w)
            self.running_var.add_(var.to(self.running_var.dtype), alpha=w)
        self.num_batches_tracked.add_(len(stats))


class SlotBatchNorm1d(SlotBatchNormMixin, nn.BatchNorm1d):
    pass


class SlotBatchNorm2d(SlotBatchNormMixin, nn.BatchNorm2d):
    pass


# ---- the same, synchronised over processes (gloo on CPUs, NCCL on GPUs) -------------------------

def synchronising():
    """True when a process group of more than one process is running (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_slot_moments(x, slots):
    """Mean and biased variance of each slot's images on ALL ranks, per channel, and their count.

    x: (S·B, C, …) this rank's batch, S = slots equal parts (B may differ between ranks). Returns
    mean (S, C), var (S, C) and count (S, 1), in float64. Each rank sends its per-slot count, sum and
    sum of squares in ONE all-reduce of an (S, 2C + 1) tensor; the sums come from this rank's mean and
    variance (stable in x's precision) and are combined in float64, where E[x²] − E[x]² loses nothing.
    """
    parts = x.unflatten(0, (slots, -1))                       # (S, B, C, …)
    dims = [1, *range(3, parts.dim())]                        # all but slot and channel
    var, mean = torch.var_mean(parts, dim=dims, correction=0)   # (S, C) each, this rank's images
    mean, var = mean.double(), var.double()
    n = parts.numel() // (parts.shape[0] * parts.shape[2])    # values per slot and channel on this rank
    count = torch.full_like(mean[:, :1], n)                   # (S, 1)
    sums = torch.cat([n * mean, n * (var + mean ** 2), count], dim=1)   # (S, 2C + 1)
    dist.all_reduce(sums)                                     # no gradient: SlotNormalise differentiates the moments
    C = mean.shape[1]
    count = sums[:, -1:]                                      # (S, 1) images × positions on all ranks
    mean = sums[:, :C] / count
    return mean, (sums[:, C:2 * C] / count - mean ** 2).clamp(min=0), count


class SlotSyncBatchNorm(SlotBatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """Per-slot BatchNorm whose statistics cover every process's images (BatchNorm1d or 2d inputs).

    In train mode under torchrun, slot s of the (S·B, C, …) batch is normalised with the mean and
    variance of slot s's images on ALL ranks, exactly as one process holding the global batch would in
    the paper's per-slot loop (Sec. 2), and the running averages move as S such calls would. All S slots
    share one all-reduce per forward (global_slot_moments) and one per backward (SlotNormalise).
    Statistics in float64, the normalisation in ≥ float32 outside autocast, the output in x's dtype and
    memory format; for backward it keeps x alone, in x's dtype (SlotNormalise).
    In eval mode, or in one process, it is SlotBatchNorm. State-dict keys are BatchNorm's.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected (N, C), (N, C, L) or (N, C, H, W) input, got {x.dim()}-D")

    def forward(self, x):                                     # x: (S·B, C, …)
        if not (self.training and synchronising()):
            return super().forward(x)                         # SlotBatchNorm: per slot, this process only
        self._check_input_dim(x)
        if x.shape[0] % self.slots:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {self.slots} equal slots")
        with torch.autocast(x.device.type, enabled=False):   # bf16/fp16 in: statistics in float32 at least
            with torch.no_grad():                             # SlotNormalise's backward differentiates them
                x32 = x.to(torch.promote_types(x.dtype, torch.float32))   # a temporary: autograd keeps x
                mean, var, count = global_slot_moments(x32, self.slots)  # (S, C), (S, C), (S, 1)
                del x32
            if self.track_running_stats:
                self.update_running_stats(mean, var, count)
            return SlotNormalise.apply(x, self.weight, self.bias, mean, var, count, self.eps)

    @torch.no_grad()
    def update_running_stats(self, mean, var, count):
        """As S train-mode BatchNorm calls, one slot after another (or filed, when deferred): the unbiased
        variance, momentum (None: the cumulative average), num_batches_tracked + 1 per slot."""
        unbiased = var * count / (count - 1)                  # (S, C)
        stats = [(m.to(self.running_mean.dtype), v.to(self.running_var.dtype)) for m, v in zip(mean, unbiased)]
        if self.batches is not None:                          # deferred: filed under the parts' names
            self.file_statistics(stats)
        else:
            self.blend(stats)


class SlotNormalise(torch.autograd.Function):
    """y = (x − μ_s) / √(σ_s² + ε) · γ + β on slot s, with μ_s, σ_s² the global moments of slot s (every
    rank's images), and its gradient through those moments written out, as torch's SyncBatchNorm does.

    Autograd keeps x alone, in x's own dtype (bf16 stays bf16): backward recomputes x̂ = (x − μ_s)/σ_s in
    ≥ float32 instead of keeping a float32 copy of the activations. For the global loss Σ_r L_r:
        ∂L/∂x = γ/σ_s · (g − mean(g) − x̂ · mean(g·x̂)),    g = ∂L/∂y,
    the means over slot s's values on ALL ranks: one all-reduce of (S, 2C) sums for all slots.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps):     # x (S·B, C, …); mean, var (S, C) float64
        rstd = torch.rsqrt(var + eps)                         # (S, C), float64
        scale, shift = rstd, -mean * rstd                     # y = x · scale + shift, as BatchNorm's CPU kernel
        if weight is not None:
            scale, shift = scale * weight, shift * weight + bias
        dtype = torch.promote_types(x.dtype, torch.float32)
        ctx.save_for_backward(x, weight, mean, rstd, count)
        # Row by row, not through a (S, B, C, …) view: a view as output would stop the in-place ReLU after.
        y = x.to(dtype) * per_row(scale, x, dtype) + per_row(shift, x, dtype)
        return y.to(x.dtype)                                  # (S·B, C, …), x's dtype and memory format

    @staticmethod
    def backward(ctx, grad):                                  # grad: (S·B, C, …)
        x, weight, mean, rstd, count = ctx.saved_tensors
        dtype = torch.promote_types(x.dtype, torch.float32)
        S, n = mean.shape[0], x.dim()
        g = grad.to(dtype).unflatten(0, (S, -1))              # (S, B, C, …)
        x_hat = x.to(dtype).unflatten(0, (S, -1)) * per_slot(rstd, n, dtype) - per_slot(mean * rstd, n, dtype)
        dims = [1, *range(3, n + 1)]                          # all but slot and channel
        sum_g, sum_gx = g.sum(dim=dims), (g * x_hat).sum(dim=dims)          # (S, C) each, this rank's images
        grad_x = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_gx.sum(0).to(weight.dtype)      # γ, β: this rank's images (DDP sums the ranks')
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_g.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            C = mean.shape[1]
            sums = torch.cat([sum_g, sum_gx], dim=1).double()  # (S, 2C)
            dist.all_reduce(sums)                             # over every rank's images of each slot
            mean_g, mean_gx = sums[:, :C] / count, sums[:, C:] / count      # (S, C), float64
            gain = rstd * weight if weight is not None else rstd            # γ/σ_s, (S, C)
            grad_x = (g - per_slot(mean_g, n, dtype) - x_hat * per_slot(mean_gx, n, dtype)) * per_slot(gain, n, dtype)
            grad_x = grad_x.flatten(0, 1).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def per_row(v, x, dtype):
    """Per-slot, per-channel values v (S, C) as (S·B, C, 1, …) in `dtype`: each slot's row repeated for
    its B images, to broadcast over the (S·B, C, …) input x."""
    return v.to(dtype).repeat_interleave(x.shape[0] // v.shape[0], dim=0).view(x.shape[0], v.shape[1],
                                                                              *[1] * (x.dim() - 2))


def per_slot(v, dim, dtype):
    """Per-slot, per-channel values v (S, C) as (S, 1, C, 1, …) in `dtype`, to broadcast over a slot
    view (S, B, C, …) of a dim-dimensional (S·B, C, …) input."""
    return v.to(dtype).view(v.shape[0], 1, v.shape[1], *([1] * (dim - 2)))


def convert_to_slot_batchnorm(module, sync=False):
    """Replace every BatchNorm1d/2d in module (or its Slot version) by SlotBatchNorm1d/2d, or by
    SlotSyncBatchNorm with sync=True (for torchrun), keeping parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            kind = SlotSyncBatchNorm if sync else SlotBatchNorm1d if isinstance(child, nn.BatchNorm1d) else SlotBatchNorm2d
        else:
            convert_to_slot_batchnorm(child, sync)
            continue
        new = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        ref = child.running_mean if child.running_mean is not None else child.weight   # dtype and device
        if ref is not None:
            new.to(ref.device, ref.dtype)
        new.load_state_dict(child.state_dict())
        setattr(module, name, new)
    return module


@contextlib.contextmanager
def slot_statistics(module, slots):
    """Inside the block, every SlotBatchNorm in module treats its batch as `slots` parts: a count, or
    a list of names, one per part (needed inside deferred_statistics, which files statistics by name)."""
    names = list(slots) if not isinstance(slots, int) else None
    layers = [m for m in module.modules() if isinstance(m, SlotBatchNormMixin)]
    for m in layers:
        m.slots, m.names = (len(names), names) if names is not None else (slots, None)
    try:
        yield
    finally:
        for m in layers:
            m.slots, m.names = 1, None


@contextlib.contextmanager
def deferred_statistics(*modules):
    """Inside the block, the train-mode SlotBatchNorm layers of modules (None: skipped) normalise as
    usual but leave their running buffers alone, filing each named batch's statistics instead; call
    apply_statistics inside the block to blend them in. Outside, everything is as before."""
    layers = [m for module in modules if module is not None for m in module.modules()
              if isinstance(m, SlotBatchNormMixin)]
    for m in layers:
        m.batches = {}
    try:
        yield
    finally:
        for m in layers:
            m.batches = None


def apply_statistics(modules, order):
    """Blend the filed statistics into the running buffers of every train-mode SlotBatchNorm in modules,
    as len(order) train-mode calls on the batches named by order, in that order, would."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, SlotBatchNormMixin) and m.training and m.track_running_stats:
                missing = [n for n in order if n not in m.batches]
                if missing:
                    raise RuntimeError(f"no statistics filed for batch(es) {missing} in {type(m).__name__}")
                m.blend([m.batches[n] for n in order])


# ---- --precise_bn: running statistics recomputed on clean images ------------------------------------

@torch.no_grad()
def precise_batchnorm(encoder, dataset, batches, batch_size, workers, device, seed=0):
    """Replace every BatchNorm layer's running mean and variance in encoder by the cumulative average (equal
    weights: momentum None) of the batch statistics of `batches` shuffled batches of dataset's clean images,
    from a reset; the training's running averages mix masked views and old weights. The encoder's weights
    are untouched and it is left in eval mode. Returns the number of images seen."""
    layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed),
                                         pin_memory=device.type == "cuda")
    encoder.train()                                           # batch statistics, folded into the running ones
    seen = 0
    fp16 = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")  # as released: CUDA only
    for _, (x, _) in zip(range(batches), loader):
        with torch.autocast(**fp16):
            encoder(x.to(device, non_blocking=True))          # (b, 3, H, W) → features, unused
        seen += len(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    encoder.eval()
    return seen
