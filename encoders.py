"""Backbones and heads of the inference model f_θ (ADIOS paper, Sec. 4), and the per-slot BatchNorm
that lets ADIOS encode N masked views in one call, in one process or synchronised over many.
README: "Reading guide".

`build_encoder(arch, img_size)` returns a backbone mapping (B, 3, H, W) to features (B, D) and D.
The heads turn features into the embeddings each base method compares. Needs torch, and torchvision
only to build a backbone (imported there).
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small")
STEMS = ("auto", "standard", "small")


def build_encoder(arch, img_size, stem="auto"):
    """Return (backbone, feat_dim).

    ResNets are torchvision's with `fc` replaced by the identity, so the state_dict keys are
    torchvision's minus `fc.*`. stem="auto" keeps the ImageNet stem (7×7 stride-2 conv + max-pool)
    from 64 px up and uses the CIFAR stem (3×3 stride-1 conv, no max-pool) below (README: "Recipes");
    "standard"/"small" force one. The small stem costs ~15× more at 32 px: on a CPU at 32 px the
    standard stem is the affordable one.
    ViTs are torchvision's VisionTransformer (patch 16) returning the CLS token's features, with the
    initialisation of the released runs' timm ViT (timm_vit_init).
    """
    if arch in ("resnet18", "resnet50"):
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        import torchvision                                    # only here: the rest of this file needs torch alone
        net = getattr(torchvision.models, arch)()
        feat_dim = net.fc.in_features                         # 512 / 2048
        net.fc = nn.Identity()
        if stem == "small" or (stem == "auto" and img_size < 64):
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net, feat_dim
    if arch in ("vit_tiny", "vit_small"):
        if img_size % 16:
            raise ValueError(f"{arch} uses 16-px patches: img_size must be a multiple of 16, got {img_size}")
        width, heads = (192, 3) if arch == "vit_tiny" else (384, 6)
        import torchvision
        net = torchvision.models.VisionTransformer(
            image_size=img_size, patch_size=16, num_layers=12, num_heads=heads,
            hidden_dim=width, mlp_dim=4 * width)
        net.heads = nn.Identity()                             # forward returns the CLS token (B, width)
        return timm_vit_init(net), width
    raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")


def timm_vit_init(net):
    """Initialise a torchvision VisionTransformer as timm 0.4.12–0.5.x initialises its VisionTransformer
    (weight_init ''), the version the released runs were built with: class token and position embedding
    trunc_normal(std .02); every Linear, and the fused q/k/v projection (timm's `qkv` Linear), trunc_normal(std
    .02) with zero bias; LayerNorm weight 1, bias 0; the patch embedding keeps PyTorch's default Conv2d init
    (timm's note: "conv was left to pytorch default"). timm's trunc_normal_ cuts at ±2 absolute (100 std),
    as torch.nn.init.trunc_normal_ does. Returns net, initialised in place."""
    trunc = lambda t: nn.init.trunc_normal_(t, std=.02, a=-2.0, b=2.0)      # noqa: E731
    with torch.no_grad():
        trunc(net.class_token)                                # (1, 1, D)
        trunc(net.encoder.pos_embedding)                      # (1, 1 + patches, D)
        net.conv_proj.reset_parameters()                      # PyTorch's default: kaiming-uniform, uniform bias
        for m in net.modules():
            if isinstance(m, nn.Linear):                      # MLPs, attention output projections
                trunc(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):        # q, k, v in one (3D, D) weight, as timm's qkv
                trunc(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return net


def simclr_projector(in_dim, hidden_dim=2048, out_dim=256):
    """SimCLR projector g: Linear → ReLU → Linear, no BatchNorm (as in the released code)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def byol_mlp(in_dim, hidden_dim=4096, out_dim=256):
    """BYOL projector and predictor: Linear → BatchNorm1d → ReLU → Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def simsiam_projector(in_dim, hidden_dim=2048, out_dim=256):
    """SimSiam projector: two Linear → BN → ReLU layers, then Linear → BN (SimSiam paper, Sec. 4)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


def simsiam_predictor(dim=256, hidden_dim=512):
    """SimSiam predictor h: a bottleneck Linear → BN → ReLU → Linear (SimSiam paper, Sec. 4)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))


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


class AllReduceWithGrad(torch.autograd.Function):
    """Sum over all processes, with a gradient: x (any shape) on each rank → Σ_r x_r on every rank.

    Every rank's loss depends on every rank's x through the sum, so the gradient for this rank's x is
    the SUM over ranks of the gradients their outputs received: the backward is one more all-reduce.
    (dist.all_reduce alone works in place and has no gradient.)
    """

    @staticmethod
    def forward(ctx, x):
        total = x.clone(memory_format=torch.contiguous_format)   # all_reduce overwrites its argument
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


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
    sums = AllReduceWithGrad.apply(torch.cat([n * mean, n * (var + mean ** 2), count], dim=1))   # (S, 2C + 1)
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
