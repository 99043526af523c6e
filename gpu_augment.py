"""--gpu_aug: the whole uint8 pretraining split on the device, both views augmented there in batches.

The recipe of data.pretrain_transform written as tensor ops over a batch, each image drawing its own
parameters, so that a GPU is not left waiting for PIL workers. README: "Recipes", "Performance".
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from data import DEFAULT_JITTER, DataError, ResumableSampler, blur_kernel_size, sample_seed
from shapes import Shapes, largest_object_class

def load_uint8(name, data_dir, img_size, download=False, num_images=None, seed=0, with_labels=False):
    """The whole pretraining split as one uint8 tensor (N, 3, H, W), for GPUAugment; with_labels=True
    returns (images, labels (N,) int64, -1 for unlabelled STL10 images).

    Shapes is generated at img_size; STL10 (96 px) and CIFAR (32 px) come as stored, without PIL (GPUAugment
    crops to img_size anyway). Image folders are not supported: ImageNet100 would need ~19 GB as uint8.
    """
    if name == "shapes":
        shapes = Shapes("train", img_size, num_images or 4096, seed)
        rendered = [shapes.render(i) for i in range(len(shapes))]
        images = torch.from_numpy(np.stack([r[0] for r in rendered])).permute(0, 3, 1, 2)  # (N, 3, H, W)
        labels = torch.tensor([largest_object_class(r[1], r[2]) for r in rendered])
    elif name in ("stl10", "cifar10", "cifar100"):
        stored = data.stored_dataset(name, data_dir, "pretrain", None, download)
        images = torch.from_numpy(stored.data)[:num_images]
        if name != "stl10":
            images = images.permute(0, 3, 1, 2)  # CIFAR stores (N, H, W, 3) -> (N, 3, H, W); STL10 is (N, 3, H, W)
        labels = torch.as_tensor(stored.labels if name == "stl10" else stored.targets)[:num_images].long()
    else:
        raise DataError(f"--gpu_aug supports shapes, stl10, cifar10 and cifar100, not {name}; drop --gpu_aug")
    images = images.contiguous()
    return (images, labels) if with_labels else images


class GPULoader:
    """--gpu_aug: the whole uint8 split on the device, both views augmented there, per batch.

    Iterates like build_loader's DataLoader: ((x_a, x_b), labels) batches of this rank's share
    (a DistributedSampler with drop_last), `sampler.set_epoch(epoch)` each epoch. Each batch draws
    its views from a generator seeded by (seed, epoch, its first image), like SeededViews: a resumed
    epoch repeats them.
    """

    def __init__(self, images, labels, batch_size, augment, seed=0):
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        self.images, self.labels, self.batch_size, self.augment = images, labels.to(images.device), batch_size, augment
        self.seed = seed
        self.sampler = ResumableSampler(range(len(images)), num_replicas=world_size, rank=rank, seed=seed,
                                        drop_last=True)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        order = list(self.sampler)                                            # this rank's indices
        for b in range(len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            idx = torch.tensor(batch, device=self.images.device)
            x = self.images[idx]                                              # (B, 3, H, W) uint8
            g = torch.Generator(self.images.device).manual_seed(sample_seed(self.seed, self.sampler.epoch, batch[0]))
            yield (self.augment(x, g), self.augment(x, g)), self.labels[idx]  # two independent views


def _gray(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma, with the weights PIL and torchvision use."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _shift_hue(x, turns):
    """Add turns (B,) to each image's HSV hue, keeping every pixel's value (max) and chroma (max - min):
    torchvision's adjust_hue, with a different shift per image."""
    r, g, b = x.unbind(1)  # (B, H, W) each
    top, chroma = x.amax(1), x.amax(1) - x.amin(1)  # (B, H, W)
    safe = chroma.clamp(min=1e-8)  # grey pixels: any hue, the result is grey again
    hue = torch.where(top == r, ((g - b) / safe) % 6, torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = (hue / 6 + turns.view(-1, 1, 1)) % 1  # (B, H, W) in turns
    # HSV -> RGB: channel n (R 5, G 3, B 1) is top - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * hue.unsqueeze(1)) % 6  # (B, 3, H, W)
    return top.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)  # (B, 3, H, W)


class GPUAugment(torch.nn.Module):
    """forward(x) with x uint8 (B, 3, H, W) on any device -> one augmented, normalised view (B, 3, S, S).

    pretrain_transform as batched tensor ops, each image drawing its own parameters: random resized crop
    (bilinear, not bicubic) and flip, colour jitter in the fixed order brightness, contrast, saturation,
    hue (torchvision shuffles the order per image) with p 0.8, grayscale p 0.2, Gaussian blur p 0.5.
    Random numbers come from `generator` if given, else the global torch RNG of x's device.
    """

    def __init__(self, img_size, mean, std, jitter=DEFAULT_JITTER, crop_scale=(0.08, 1.0)):
        super().__init__()
        self.img_size, self.jitter, self.kernel_size = img_size, tuple(jitter), blur_kernel_size(img_size)
        self.crop_scale = crop_scale
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x, generator=None):
        rand = lambda *shape: torch.rand(*shape, device=x.device, generator=generator)  # noqa: E731
        x = x.float() / 255  # (B, 3, H, W) in [0, 1]
        x = self.crop_and_flip(x, rand)  # (B, 3, S, S)
        x = self.color_jitter(x, rand)
        x = torch.where(rand(len(x), 1, 1, 1) < 0.2, _gray(x).expand_as(x), x)  # grayscale, p 0.2
        x = self.blur(x, rand)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def crop_and_flip(self, x, rand):
        """Per-image boxes as in RandomResizedCrop (scale crop_scale, ratio 3/4-4/3), sampled by affine grids."""
        B, _, H, W = x.shape
        # RandomResizedCrop tries up to 10 (area, log-ratio) pairs and keeps the first box that fits: try
        # all 10 at once and take the first that fits, else the whole image (its fallback, for square images).
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * rand(B, 10)  # fraction of the image, (B, 10)
        ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * rand(B, 10))  # width / height, (B, 10)
        w, h = torch.sqrt(area * ratio * H / W), torch.sqrt(area / ratio * W / H)  # fractions of W and H
        fits = (w <= 1) & (h <= 1)
        first = fits.float().argmax(1, keepdim=True)  # (B, 1)
        w = torch.where(fits.any(1), w.gather(1, first)[:, 0], 1.0)  # (B,)
        h = torch.where(fits.any(1), h.gather(1, first)[:, 0], 1.0)  # (B,)
        # In grid_sample's [-1, 1] coordinates the box centre lies within +-(1 - side).
        theta = torch.zeros(B, 2, 3, device=x.device)
        theta[:, 0, 0] = w * torch.where(rand(B) < 0.5, -1.0, 1.0)  # negative scale = horizontal flip
        theta[:, 0, 2] = (1 - w) * (2 * rand(B) - 1)
        theta[:, 1, 1] = h
        theta[:, 1, 2] = (1 - h) * (2 * rand(B) - 1)
        grid = F.affine_grid(theta, (B, 3, self.img_size, self.img_size), align_corners=False)  # (B, S, S, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)  # (B, 3, S, S)

    def color_jitter(self, x, rand):
        """ColorJitter with p 0.8: images that skip it get identity factors, so there is no branch."""
        B = len(x)
        on = (rand(B) < 0.8).float()  # (B,)

        def factor(strength):  # U(max(0, 1 - strength), 1 + strength) as torchvision; 1 where off
            low = max(0.0, 1 - strength)
            return (1 + on * (low + (1 + strength - low) * rand(B) - 1)).view(B, 1, 1, 1)

        brightness, contrast, saturation, hue = self.jitter
        x = (x * factor(brightness)).clamp(0, 1)
        c = factor(contrast)
        x = (c * x + (1 - c) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)  # towards the mean grey
        s = factor(saturation)
        x = (s * x + (1 - s) * _gray(x)).clamp(0, 1)  # towards each pixel's own grey
        return _shift_hue(x, on * hue * (2 * rand(B) - 1))

    def blur(self, x, rand):
        """Gaussian blur with p 0.5, sigma ~ U(0.1, 2) per image: one separable grouped conv for the batch."""
        B, C, S, _ = x.shape
        k = self.kernel_size
        taps = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2  # (k,)
        sigma = 0.1 + 1.9 * rand(B, 1)  # (B, 1)
        kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))  # (B, k)
        kernel = kernel / kernel.sum(1, keepdim=True)
        kernel = torch.where(rand(B, 1) < 0.5, kernel, (taps == 0).to(x.dtype))  # unblurred: identity kernel
        kernel = kernel.repeat_interleave(C, 0)  # one kernel per (image, channel), (B*C, k)
        y = x.reshape(1, B * C, S, S)  # images and channels as groups of one conv
        y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kernel.view(B * C, 1, 1, k), groups=B * C)
        y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kernel.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, S, S)  # (B, 3, S, S)
