"""The occlusion model M_φ of ADIOS: a small U-Net that splits every image into N soft masks.

Shi et al., "Adversarial Masking for Self-Supervised Learning", ICML 2022, Sec. 2.2 and App. B;
the architecture below is the one of the released code (ADIOS_SPEC.md §2). README: "Reading guide".
Needs only torch: copy this file alone if you want the mask generator elsewhere.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("gn", "in", "none")


def conv_block(in_ch, out_ch, norm):
    """3×3 conv (stride 1, pad 1) → norm → ReLU; the conv has a bias only when there is no norm."""
    layers = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=(norm == "none"))]
    if norm == "gn":
        layers.append(nn.GroupNorm(8, out_ch))
    elif norm == "in":
        layers.append(nn.InstanceNorm2d(out_ch, affine=True))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def unet_channels(num_blocks, c):
    """Input/output channels of the down and up blocks, as in the table of ADIOS_SPEC.md §2.

    Down: the last three blocks are 2c wide, the ones before them c. Up block i concatenates its
    input with the skip of down block K-1-i, so its input is (previous output + skip) wide; the
    first two up blocks are 2c wide, the rest c. For K = 5: down c,c,2c,2c,2c; up 2c,2c,c,c,c.
    """
    down_out = [c if k < num_blocks - 3 else 2 * c for k in range(num_blocks)]
    down_in = [3] + down_out[:-1]
    up_out = [2 * c if i < 2 else c for i in range(num_blocks)]
    x_in = [down_out[-1]] + up_out[:-1]                      # what arrives from below
    up_in = [x + skip for x, skip in zip(x_in, reversed(down_out))]
    return down_in, down_out, up_in, up_out


class Masker(nn.Module):
    """U-Net mask generator: images (B, 3, H, W) → N masks (B, N, H, W) that sum to 1 over N.

    num_masks:      N, the number of slots (≥ 2; with N = 1 the only mask would hide everything).
    img_size:       H = W. The bottleneck MLP ties the network to this one size.
    base_channels:  c, the U-Net's base width (the released runs use 8 to 128).
    norm:           "gn" (GroupNorm, 8 groups), "in" (InstanceNorm, affine) or "none".
    num_blocks:     K; None means int(log2(img_size) - 1): 4 at 32 px, 5 at 64/96 px, 6 at 224 px.
    """

    def __init__(self, num_masks, img_size, base_channels=32, norm="gn", num_blocks=None):
        super().__init__()
        K = int(math.log2(img_size) - 1) if num_blocks is None else num_blocks
        check_masker_args(num_masks, img_size, base_channels, norm, K)
        self.num_masks, self.img_size, self.num_blocks = num_masks, img_size, K
        c = base_channels
        down_in, down_out, up_in, up_out = unet_channels(K, c)
        self.down = nn.ModuleList(conv_block(i, o, norm) for i, o in zip(down_in, down_out))
        self.up = nn.ModuleList(conv_block(i, o, norm) for i, o in zip(up_in, up_out))

        # Bottleneck: an MLP over the whole flattened (2c, f, f) map, f = img_size / 2^(K-1).
        self.f = img_size // 2 ** (K - 1)
        flat = down_out[-1] * self.f ** 2
        self.mlp = nn.Sequential(
            nn.Linear(flat, 128), nn.ReLU(inplace=True),
            nn.Linear(128, 128), nn.ReLU(inplace=True),
            nn.Linear(128, flat), nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(up_out[-1], num_masks, 1)      # 1×1 conv: c → N mask logits

    def forward(self, x):                                     # x: (B, 3, H, W)
        skips = []
        for k, block in enumerate(self.down):
            x = block(x)
            skips.append(x)
            if k < self.num_blocks - 1:                       # nearest downsampling, no pooling
                x = F.interpolate(x, scale_factor=0.5, mode="nearest")
        B, C, f, _ = x.shape                                  # (B, 2c, f, f)
        x = self.mlp(x.flatten(1)).view(B, C, f, f)
        for i, block in enumerate(self.up):
            x = block(torch.cat([x, skips[-1 - i]], dim=1))   # (B, up_in[i], h, w) → (B, up_out[i], h, w)
            if i < self.num_blocks - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        logits = self.head(x)                                 # (B, N, H, W)
        return logits.softmax(dim=1)                          # the N masks partition every pixel


def check_masker_args(num_masks, img_size, base_channels, norm, num_blocks):
    """Raise ValueError, in one line, for anything the architecture cannot take."""
    if num_masks < 2:
        raise ValueError(f"num_masks (N) must be at least 2, got {num_masks}: with one slot the "
                         "mask covers the whole image (use N = 0 in train.py for the plain base method)")
    if norm not in NORMS:
        raise ValueError(f"mask norm must be one of {NORMS}, got {norm!r}")
    if num_blocks < 2:
        raise ValueError(f"the U-Net needs at least 2 blocks, got {num_blocks} (img_size {img_size})")
    step = 2 ** (num_blocks - 1)
    if img_size % step:
        raise ValueError(f"img_size {img_size} does not fit a {num_blocks}-block U-Net: it must be a "
                         f"multiple of {step}, e.g. {step * max(1, img_size // step)} or "
                         f"{step * (img_size // step + 1)}")
    if norm == "gn" and base_channels % 8:
        raise ValueError(f"mask base_channels {base_channels} cannot be split into GroupNorm's 8 "
                         "groups: use a multiple of 8 (8, 16, 32, 64, 128) or norm 'in'/'none'")
