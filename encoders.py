"""Backbones and heads of the inference model f_θ (ADIOS_SPEC.md §4–5), and the per-slot BatchNorm
that lets ADIOS encode N masked views in one call. README: "Reading guide".

`build_encoder(arch, img_size)` returns a backbone mapping (B, 3, H, W) to features (B, D) and D.
The heads turn features into the embeddings each base method compares. Needs torch and torchvision.
"""
import contextlib

import torch
import torch.nn as nn
import torchvision

ARCHS = ("resnet18", "resnet50", "vit_tiny", "vit_small")
STEMS = ("auto", "standard", "small")


def build_encoder(arch, img_size, stem="auto"):
    """Return (backbone, feat_dim).

    ResNets are torchvision's with `fc` replaced by the identity, so the state_dict keys are
    torchvision's minus `fc.*`. stem="auto" keeps the ImageNet stem (7×7 stride-2 conv + max-pool)
    from 64 px up and uses the CIFAR stem (3×3 stride-1 conv, no max-pool) below (ADIOS_SPEC.md §5);
    "standard"/"small" force one. The small stem costs ~15× more at 32 px: on a CPU at 32 px the
    standard stem is the affordable one.
    ViTs are torchvision's VisionTransformer (patch 16) returning the CLS token's features.
    """
    if arch in ("resnet18", "resnet50"):
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
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
        net = torchvision.models.VisionTransformer(
            image_size=img_size, patch_size=16, num_layers=12, num_heads=heads,
            hidden_dim=width, mlp_dim=4 * width)
        net.heads = nn.Identity()                             # forward returns the CLS token (B, width)
        return net, width
    raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")


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
    With slots == 1, or in eval mode, this is the plain BatchNorm. State-dict keys are BatchNorm's.
    """
    slots = 1

    def forward(self, x):                                     # x: (S·B, C, ...)
        if self.slots == 1 or not self.training:
            return super().forward(x)
        batch_norm = super().forward
        return torch.cat([batch_norm(part) for part in x.chunk(self.slots)])   # slot by slot, in order


class SlotBatchNorm1d(SlotBatchNormMixin, nn.BatchNorm1d):
    pass


class SlotBatchNorm2d(SlotBatchNormMixin, nn.BatchNorm2d):
    pass


class SlotSyncBatchNorm(SlotBatchNormMixin, nn.SyncBatchNorm):
    """Per-slot statistics synchronised across GPUs: SyncBatchNorm run once per slot."""


def convert_to_slot_batchnorm(module, sync=False):
    """Replace every BatchNorm1d/2d in module (or its Slot version) by SlotBatchNorm1d/2d, or by
    SlotSyncBatchNorm with sync=True, keeping parameters and buffers."""
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
    """Inside the block, every SlotBatchNorm in module treats its batch as `slots` parts."""
    layers = [m for m in module.modules() if isinstance(m, SlotBatchNormMixin)]
    for m in layers:
        m.slots = slots
    try:
        yield
    finally:
        for m in layers:
            m.slots = 1
