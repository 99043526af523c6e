"""The inference model f_θ (ADIOS paper, Sec. 4): a backbone, the base method's heads, and the online
linear probe, as one module. README: "Reading guide".

`build_encoder(arch, img_size)` returns a backbone mapping (B, 3, H, W) to features (B, D) and D.
The heads turn features into the embeddings each base method compares. Needs torch, and torchvision
only to build a backbone (imported there).
"""
from collections import namedtuple

import torch
import torch.nn as nn

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


def heads(method, feat_dim, proj_hidden_dim, proj_output_dim, pred_hidden_dim):
    """(projector, predictor or None) of the base method, with the released runs' layer layouts."""
    if method == "simclr":
        return simclr_projector(feat_dim, proj_hidden_dim, proj_output_dim), None
    if method == "byol":
        return (byol_mlp(feat_dim, proj_hidden_dim, proj_output_dim),
                byol_mlp(proj_output_dim, pred_hidden_dim or proj_hidden_dim, proj_output_dim))
    return (simsiam_projector(feat_dim, proj_hidden_dim, proj_output_dim),
            simsiam_predictor(proj_output_dim, pred_hidden_dim or 512))


# ---- the inference model f_θ -------------------------------------------------------------------

# f_θ's outputs: features h (B, feat_dim), projection z (B, out), prediction p (B, out) or None, logits or None.
Outputs = namedtuple("Outputs", "h z p logits")


class InferenceModel(nn.Module):
    """f_θ: backbone → projector (→ predictor), plus the online linear probe on detached features.
    One module, so that train.py can give it a single DistributedDataParallel wrapper."""

    def __init__(self, encoder, projector, predictor=None, classifier=None):
        super().__init__()
        self.encoder, self.projector, self.predictor, self.classifier = encoder, projector, predictor, classifier

    def forward(self, x, classify=False, probe_only=False):
        if probe_only:            # the probe's pass of a crop: the backbone without a graph (only the probe reads h)
            with torch.no_grad():
                h = self.encoder(x)                           # (B, feat_dim)
            return Outputs(h, None, None, self.classifier(h) if self.classifier is not None else None)
        h = self.encoder(x)                                   # (B, feat_dim)
        z = self.projector(h)                                 # (B, out)
        p = self.predictor(z) if self.predictor is not None else None
        # The probe sees detached features: it learns from the encoder, never changes it.
        logits = self.classifier(h.detach()) if classify else None
        return Outputs(h, z, p, logits)
