"""Tests for gpu_augment.py (--gpu_aug), run here on the CPU; never touch the network."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import data
import gpu_augment
import run_setup
from helpers import CPU, parsed

torch.set_num_threads(1)


def test_load_uint8():
    images = gpu_augment.load_uint8("shapes", None, 32, num_images=5)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[2].permute(1, 2, 0), torch.from_numpy(data.Shapes().render(2)[0]))
    with pytest.raises(data.DataError, match="gpu_aug"):
        gpu_augment.load_uint8("imagefolder", "/nonexistent", 32)


def test_load_uint8_stored_layouts(monkeypatch):
    class Stored:  # what torchvision keeps in .data: CIFAR (N, H, W, 3), STL10 (N, 3, H, W)
        def __init__(self, array):
            self.data = array
            self.labels = self.targets = list(range(len(array)))  # STL10 / CIFAR label attributes

    hwc = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(data, "stored_dataset", lambda *args: Stored(hwc))
    images = gpu_augment.load_uint8("cifar10", "/unused", 32, num_images=4)
    assert images.shape == (4, 3, 32, 32) and torch.equal(images[1, 2], torch.from_numpy(hwc[1, :, :, 2]))
    monkeypatch.setattr(data, "stored_dataset", lambda *args: Stored(hwc.transpose(0, 3, 1, 2)))
    assert gpu_augment.load_uint8("stl10", "/unused", 96).shape == (6, 3, 32, 32)
    images, labels = gpu_augment.load_uint8("stl10", "/unused", 96, num_images=5, with_labels=True)
    assert labels.tolist() == [0, 1, 2, 3, 4] and len(images) == 5


def test_gpu_loader_yields_two_views_of_this_ranks_share():
    images, labels = gpu_augment.load_uint8("shapes", None, 32, num_images=20, with_labels=True)
    assert labels.tolist() == [data.Shapes("train", 32, 20).label(i) for i in range(20)]
    info = data.dataset_info("shapes")
    loader = gpu_augment.GPULoader(images, labels, 8, gpu_augment.GPUAugment(32, info["mean"], info["std"]))
    batches = list(loader)
    assert len(loader) == len(batches) == 2                   # drop_last: 20 images → two batches of 8
    (x_a, x_b), y = batches[0]
    assert x_a.shape == x_b.shape == (8, 3, 32, 32) and not torch.equal(x_a, x_b) and y.shape == (8,)


def test_gpu_views_draw_their_own_crops(monkeypatch):
    crops = []
    real = gpu_augment.GPUAugment.crop_and_flip
    monkeypatch.setattr(gpu_augment.GPUAugment, "crop_and_flip", lambda self, *a: crops.append(real(self, *a)) or crops[-1])
    images, labels = gpu_augment.load_uint8("shapes", None, 32, num_images=8, with_labels=True)
    info = data.dataset_info("shapes")
    next(iter(gpu_augment.GPULoader(images, labels, 8, gpu_augment.GPUAugment(32, info["mean"], info["std"]))))
    assert len(crops) == 2 and ((crops[0] - crops[1]).flatten(1).abs().amax(1) > 0).all()   # per image


def test_gpu_augment_shape_and_per_image_params():
    augment = gpu_augment.GPUAugment(24, data.SHAPES_MEAN, data.SHAPES_STD)
    x = gpu_augment.load_uint8("shapes", None, 32, num_images=1).expand(16, 3, 32, 32)  # one image, 16 times
    y = augment(x)
    assert y.shape == (16, 3, 24, 24) and y.dtype == torch.float32
    flat = y.flatten(1)
    assert (torch.cdist(flat, flat) + torch.eye(16)).min() > 1e-3  # every copy got its own parameters
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(augment(x, generator=g()), augment(x, generator=g()))


def test_gpu_augment_grey_without_jitter():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    augment = gpu_augment.GPUAugment(32, mean, std, jitter=(0, 0, 0, 0))
    y = augment(torch.full((32, 3, 40, 40), 100, dtype=torch.uint8))
    expected = (100 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(y, expected.view(1, 3, 1, 1).expand_as(y), atol=1e-4)


def test_gpu_augment_matches_pil_statistics():
    torch.manual_seed(0)
    n = 256
    info = data.dataset_info("shapes")
    augment = gpu_augment.GPUAugment(32, info["mean"], info["std"], info["jitter"], info["crop_scale"])
    gpu = torch.cat([augment(gpu_augment.load_uint8("shapes", None, 32, num_images=n))
                     for _ in range(2)])
    pil = data.build_pretrain_dataset("shapes", None, 32, num_images=n)
    pil = torch.stack([v for i in range(n) for v in pil[i][0]])
    # Different interpolation and sample noise only: channel statistics agree within ~0.05 (0.15 allowed).
    assert (gpu.mean((0, 2, 3)) - pil.mean((0, 2, 3))).abs().max() < 0.15
    assert (gpu.std((0, 2, 3)) - pil.std((0, 2, 3))).abs().max() < 0.15


# ---- wiring 6: --gpu_aug: the crop scale it is given, and torchvision's hue shift --------------------------

def test_gpu_augment_honours_its_crop_scale():
    # Scale (1, 1): RandomResizedCrop finds no box of area 1 with a ratio ≠ 1 and keeps the whole image,
    # flipped or not. The loader train.py builds passes the dataset's scale on (shapes: 0.5-1).
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.rand(*shape, generator=g)                       # noqa: E731
    whole = gpu_augment.GPUAugment(32, (0.5,) * 3, (0.25,) * 3, crop_scale=(1.0, 1.0))
    out = whole.crop_and_flip(x, rand)
    kept = [(out[i] - x[i]).abs().max() < 1e-5 for i in range(16)]
    flipped = [(out[i] - x[i].flip(-1)).abs().max() < 1e-5 for i in range(16)]
    assert all(k or f for k, f in zip(kept, flipped)) and any(kept) and any(flipped)
    small = gpu_augment.GPUAugment(32, (0.5,) * 3, (0.25,) * 3, crop_scale=(0.1, 0.1)).crop_and_flip(x, rand)
    assert all((small[i] - x[i]).abs().max() > 1e-2 and (small[i] - x[i].flip(-1)).abs().max() > 1e-2
               for i in range(16))
    loader = run_setup.build_data(parsed("--gpu_aug"), CPU, 1, True)[0]
    assert loader.augment.crop_scale == data.DATASETS["shapes"]["crop_scale"] == (0.5, 1.0)


def test_gpu_hue_shift_equals_torchvision_adjust_hue():
    # The jitter's hue step alone (strengths 0 for the rest) with known draws: each image jittered
    # (draw 0 < 0.8) gets adjust_hue(x, 0.3·(2u − 1)); the one not jittered (draw 0.9) stays as it was.
    B = 6
    x = torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
    on = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.9])
    draws = iter([on, torch.rand(B), torch.rand(B), torch.rand(B), u])      # on, brightness, contrast, saturation, hue
    augment = gpu_augment.GPUAugment(8, (0.5,) * 3, (0.25,) * 3, jitter=(0, 0, 0, 0.3))
    out = augment.color_jitter(x, lambda *shape: next(draws))
    for i in range(B - 1):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], 0.3 * (2 * u[i].item() - 1)), rtol=0, atol=2e-6)
    torch.testing.assert_close(out[B - 1], x[B - 1], rtol=0, atol=2e-6)
