"""The occlusion model M_φ of ADIOS: a small U-Net that splits every image into N soft masks.

Shi et al., "Adversarial Masking for Self-Supervised Learning", ICML 2022;
the paper's occlusion model is a U-Net; its depth, widths and MLP bottleneck below are the released
code's. README: "Reading guide".
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
    """Input/output channels of the down and up blocks of a K-block U-Net with base width c.

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
    if base_channels < 1:
        raise ValueError(f"mask base_channels must be at least 1, got {base_channels}")
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


# ---- mask-scheme baselines (the paper's comparison of masking schemes) ----------------------------------
# Drop-in replacements for the learned masker in ADIOS's masker slot: forward(x) returns ONE slot
# to hide, (B, 1, H, W), float 0/1 with 1 = hidden, so `occlude` computes x·(1 − m). They have no
# parameters and are never trained (there is no mask step), and they look at x only for its
# shape, dtype and device. Each image draws its own mask from the global RNG of x's device
# (or `generator`).

def paper_patch_size(img_size):
    """The paper's 16-px patches at 224 px scaled to the image: 2 px at 32 px, 7 px at 96 px."""
    return max(1, round(img_size * 16 / 224))


class RandomPatchMasker(nn.Module):
    """MAE-like random patches (He et al. 2022): hide `ratio` of the cells of a patch grid.

    The grid has ceil(H / patch) × ceil(W / patch) cells and each image hides exactly
    round(ratio · cells) of them. Where patch does not divide the image (96 px with 7-px patches:
    a 14 × 14 grid), the last row and column of cells are cropped (5 px wide), so the hidden pixel
    fraction is ratio up to those smaller cells. At 32 px: 2-px patches, 16 × 16 grid, 192 hidden.
    """

    num_masks = 1

    def __init__(self, img_size, ratio=0.75, patch=None):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.img_size, self.ratio = img_size, ratio
        self.patch = paper_patch_size(img_size) if patch is None else patch

    @torch.no_grad()
    def forward(self, x, generator=None):                     # x: (B, C, H, W), only its shape is used
        B, _, H, W = x.shape
        p = self.patch
        gh, gw = -(-H // p), -(-W // p)                       # ceil: cells per column / row
        hidden = round(self.ratio * gh * gw)
        noise = torch.rand(B, gh * gw, device=x.device, generator=generator)      # (B, cells)
        cells = torch.zeros(B, gh * gw, device=x.device)
        cells.scatter_(1, noise.topk(hidden, dim=1).indices, 1.0)                 # `hidden` random cells = 1
        cells = cells.view(B, 1, gh, gw)
        pixels = cells.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)   # (B, 1, gh·p, gw·p)
        return pixels[:, :, :H, :W].to(mask_dtype(x))        # (B, 1, H, W)


class BlockMasker(nn.Module):
    """BEiT-like random blocks (Bao et al. 2022): add rectangles until `ratio` of the image is hidden.

    Rectangle area is drawn uniformly in [min_area, max(min_area, what is still missing)], so each
    addition is capped to land near the target (as BEiT caps its blocks) and the loop stops at the
    first rectangle that reaches it: every image hides at least ceil(ratio · H · W) pixels and at most
    a few pixels more (one min_area block, or the rounding of h and w). Aspect ratio h/w is
    log-uniform in `aspect`; h and w are clipped to the image. min_area = 64 px at 224 px scaled by
    (img_size / 224)², at least 4 px (a 2 × 2 block): 4 px at 32 px, 12 px at 96 px.
    The loop runs over rectangles, for all unfinished images of the batch at once (each image draws
    its own rectangle); an image that reaches its target leaves the loop. ~10 ms for 256 images at
    32 px on one CPU thread.
    """

    num_masks = 1

    def __init__(self, img_size, ratio=0.3, min_area=None, aspect=(0.3, 1 / 0.3)):
        super().__init__()
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.img_size, self.ratio = img_size, ratio
        self.min_area = max(4, round(64 * (img_size / 224) ** 2)) if min_area is None else min_area
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    @torch.no_grad()
    def forward(self, x, generator=None):                     # x: (B, C, H, W), only its shape is used
        B, _, H, W = x.shape
        dev = x.device
        rows = torch.arange(H, device=dev).view(1, H, 1)      # (1, H, 1)
        cols = torch.arange(W, device=dev).view(1, 1, W)      # (1, 1, W)
        hidden = torch.zeros(B, H, W, device=dev)             # 1 = hidden
        target = math.ceil(self.ratio * H * W)
        missing = torch.full((B,), float(target), device=dev)
        todo = torch.arange(B, device=dev)                    # images still short of the target
        while len(todo):
            n = len(todo)
            rand = lambda: torch.rand(n, 1, 1, device=dev, generator=generator)  # noqa: E731
            cap = missing[todo].view(n, 1, 1).clamp(min=self.min_area)
            area = self.min_area + (cap - self.min_area) * rand()                # (n, 1, 1)
            aspect = torch.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rand())
            h = (area * aspect).sqrt().round().clamp(1, H)
            w = (area / aspect).sqrt().round().clamp(1, W)
            top = ((H - h + 1) * rand()).floor()                                 # in [0, H − h]
            left = ((W - w + 1) * rand()).floor()
            in_rows = ((rows >= top) & (rows < top + h)).float()                 # (n, H, 1)
            in_cols = ((cols >= left) & (cols < left + w)).float()               # (n, 1, W)
            now = torch.maximum(hidden[todo], in_rows * in_cols)                 # (n, H, W)
            hidden[todo], missing[todo] = now, target - now.sum(dim=(1, 2))
            todo = todo[missing[todo] > 0]
        return hidden.unsqueeze(1).to(mask_dtype(x))          # (B, 1, H, W)


def mask_dtype(x):
    """The baselines' masks take x's floating dtype (float32 for integer images)."""
    return x.dtype if x.is_floating_point() else torch.float32
