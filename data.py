"""Data for ADIOS: datasets, the two-view augmentation, and loaders (gpu_augment.py: the same views on a GPU).

Datasets (`--dataset`), and what `--data_dir` must hold:
    shapes       nothing: a synthetic set of discs, squares, triangles and crosses drawn on the fly, with a
                 ground-truth object map per image (the masks' adjusted Rand index, README "Evidence on shapes")
    stl10        data_dir/stl10_binary/        pretrain on train+unlabeled (105k), probe train 5k / test 8k
    cifar10/100  data_dir/cifar-10-batches-py/ or cifar-100-python/
    flowers102   data_dir/flowers-102/         transfer only: probe on train+val, test on test
    imagenet100  data_dir/train/<class>/*.JPEG and data_dir/val/<class>/*.JPEG (the CMC 100-class list)
    imagefolder  the same layout, any classes (Backgrounds Challenge, iNaturalist 2021: README "Recipes")
torchvision's files are downloaded only when asked (`download=True`); otherwise a missing dataset raises
DataError with a one-line fix. README: "Quickstart", "Recipes", "When things go wrong".
"""
import itertools
import os

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from shapes import Shapes


class DataError(ValueError):
    """A dataset is unknown, absent, incomplete or corrupt; the message says how to fix it, in one line."""


# ---- per-dataset defaults (as the released code; README "Recipes") ----

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)  # as the released code, for STL10 too
# 0.228, not torchvision's 0.229: the released value, kept so that the numbers match the released runs.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
# Measured over the first 2048 training images of Shapes(seed=0) at 32 px, data version 2 (shapes.VERSION;
# the statistics barely move with size).
SHAPES_MEAN, SHAPES_STD = (0.500, 0.500, 0.499), (0.189, 0.189, 0.189)

DATASETS = {
    # Milder views for the CPU demo (docs/demo_design.md): with the paper's jitter (0.8, 0.8, 0.8, 0.2)
    # SimCLR's loss stayed at chance through the first epochs; crops of 50-100 % keep the large shape in view.
    "shapes": dict(img_size=32, mean=SHAPES_MEAN, std=SHAPES_STD, num_classes=4,
                   jitter=(0.4, 0.4, 0.4, 0.1), crop_scale=(0.5, 1.0)),
    "stl10": dict(img_size=96, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10),
    "cifar10": dict(img_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10),
    "cifar100": dict(img_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=100),
    # Transfer target: 96 px to match encoders pretrained on STL10 / ImageNet100-S; pass img_size to change it.
    "flowers102": dict(img_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=102),
    "imagenet100": dict(img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=100),
    "imagefolder": dict(img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=None),  # counted
}


def dataset_info(name):
    """img_size, mean, std and num_classes for a dataset name (num_classes None: count the class folders)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# ---- torchvision datasets and image folders ----

# name: (the folder torchvision keeps under data_dir, how to fetch it by hand)
_ARCHIVE = "fetch {url} by hand and unpack it in {data_dir}, so that {path} exists"
_TORCHVISION = {
    "stl10": ("stl10_binary", _ARCHIVE.replace("{url}", datasets.STL10.url)),
    "cifar10": ("cifar-10-batches-py", _ARCHIVE.replace("{url}", datasets.CIFAR10.url)),
    "cifar100": ("cifar-100-python", _ARCHIVE.replace("{url}", datasets.CIFAR100.url)),
    "flowers102": ("flowers-102", f"fetch 102flowers.tgz, imagelabels.mat and setid.mat by hand from "
                   f"{datasets.Flowers102._download_url_prefix} and put them in {{path}}, the .tgz unpacked (jpg/)"),
}
IMG_EXTENSIONS = datasets.folder.IMG_EXTENSIONS  # the files ImageFolder reads; it skips all others


def _torchvision_dataset(name, data_dir, split, transform, download):
    """split is 'pretrain', 'train' or 'test'. Checks for the folder first: torchvision's own error is vague."""
    folder, by_hand = _TORCHVISION[name]
    path = os.path.join(data_dir, folder)
    fix = by_hand.format(data_dir=data_dir, path=path)
    if not download and not os.path.isdir(path):
        raise DataError(f"{name} not found in --data_dir {data_dir}: pass --download, or {fix}")
    try:
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
            return datasets.STL10(data_dir, split=stl_split, transform=transform, download=download)
        if name in ("cifar10", "cifar100"):
            cifar = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return cifar(data_dir, train=split != "test", transform=transform, download=download)
        if split == "test":
            return datasets.Flowers102(data_dir, split="test", transform=transform, download=download)
        # Flowers102 has 10 images per class in train and 10 in val: a probe gets both.
        return ConcatDataset([datasets.Flowers102(data_dir, split=s, transform=transform, download=download)
                              for s in ("train", "val")])
    except Exception as e:  # offline (URLError), bad checksum or missing file (RuntimeError), broken archive...
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if download:
            raise DataError(f"{name}: download into {data_dir} failed ({reason}); {fix}") from e
        raise DataError(f"{name}: files under {path} are incomplete or corrupt ({reason}); "
                        f"delete them and pass --download, or {fix}") from e


def _has_image(folder):
    return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder, followlinks=True) for f in files)


def check_image_folder(root):
    """Cheap layout checks before training: root/train/<class>/<images> and root/val/<class>/<images>.

    Also requires the same class folders in both splits: ImageFolder numbers classes by sorted name, so a
    class missing from val would silently shift every val label after it. Returns the class names.
    """
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image>"
    if not os.path.isdir(root):
        raise DataError(f"image folder --data_dir {root} does not exist; {layout}")
    classes = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DataError(f"{root} has no {split}/ folder; {layout}")
        classes[split] = sorted(e.name for e in os.scandir(path) if e.is_dir())
        if not classes[split]:
            raise DataError(f"{path} holds no class folders; {layout}")
        for c in classes[split]:
            if not _has_image(os.path.join(path, c)):
                raise DataError(f"class folder {os.path.join(path, c)} holds no images ({' '.join(IMG_EXTENSIONS)})")
    if classes["train"] != classes["val"]:
        odd = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataError(f"train/ and val/ under {root} hold different class folders (e.g. {odd[:3]}): "
                        "labels would not match")
    return classes["train"]


def find_bad_images(root, limit=None, share=(0, 1)):
    """Open each image file ImageFolder would read under root (sorted; the first `limit` if given) and raise
    DataError naming the first one PIL cannot parse. Returns how many were checked. share=(k, K): only
    every K-th file from the k-th (K processes share the scan).

    Image.verify() reads the file's structure without decoding the pixels: about 0.1 ms a file, so a whole
    ImageNet100 folder takes a minute or two; pass limit for a quicker spot check. verify() passes a
    truncated JPEG, so a JPEG whose last bytes lack the end-of-image marker is decoded in full as well.
    """
    checked = seen = 0
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        dirnames.sort()
        for f in sorted(files):
            if not f.lower().endswith(IMG_EXTENSIONS):
                continue
            if limit is not None and checked >= limit:
                return checked
            seen += 1
            if (seen - 1) % share[1] != share[0]:
                continue
            path = os.path.join(dirpath, f)
            try:
                with Image.open(path) as img:
                    img.verify()
                if _jpeg_without_end(path):
                    with Image.open(path) as img:
                        img.load()                  # raises OSError "image file is truncated"
            except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... depending on the format
                raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e}); "
                                "delete or replace it") from e
            checked += 1
    return checked


def _jpeg_without_end(path):
    """True for a JPEG file whose last 64 bytes lack the end-of-image marker FF D9 (cut short, or padded)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":                      # not a JPEG
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        return b"\xff\xd9" not in f.read()


def _image_folder(data_dir, split, transform):
    check_image_folder(data_dir)
    return datasets.ImageFolder(os.path.join(data_dir, "val" if split == "test" else "train"), transform=transform)


def extra_test_set(path, classes, transform):
    """An extra test set for a probe trained on an image folder whose class folders are `classes`
    (sorted, as ImageFolder numbers them): robustness (the Backgrounds Challenge's mixed_rand, only_fg,
    ...) or any other test images of the same classes.

    path holds val/<class>/<image> (the Backgrounds Challenge release: bg_challenge/mixed_same/val/00_dog/...)
    or <class>/<image> directly. Its class folders must be some of `classes`, matched by name, so a test
    folder that lacks a class still gets the training labels. Returns an ImageFolder yielding (image, label).
    """
    root = os.path.join(path, "val") if os.path.isdir(os.path.join(path, "val")) else path
    layout = f"expected {path}/val/<class>/<image> or {path}/<class>/<image>"
    if not os.path.isdir(root):
        raise DataError(f"--test_dirs {path} does not exist; {layout}")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    unknown = [c for c in found if c not in classes]
    if not found or unknown:
        what = f"class folders the training folder lacks ({', '.join(unknown[:3])})" if unknown else "no class folders"
        named = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
        raise DataError(f"--test_dirs {path}: {root} holds {what}; name its class folders as the training "
                        f"folder's ({named}), or leave it out of --test_dirs")
    for c in found:
        if not _has_image(os.path.join(root, c)):
            raise DataError(f"--test_dirs {path}: class folder {os.path.join(root, c)} holds no images "
                            f"({' '.join(IMG_EXTENSIONS)})")
    dataset = datasets.ImageFolder(root, transform=transform)
    label = {c: classes.index(c) for c in found}          # this folder's class -> the training label
    dataset.samples = [(file, label[dataset.classes[k]]) for file, k in dataset.samples]
    dataset.targets = [k for _, k in dataset.samples]
    dataset.imgs, dataset.classes = dataset.samples, list(classes)
    dataset.class_to_idx = {c: i for i, c in enumerate(classes)}
    return dataset


def build_test_folders(name, paths, classes, img_size):
    """{path: extra_test_set} with the dataset's test view, for eval_linear.py --test_dirs."""
    info = dataset_info(name)
    transform = eval_transform(img_size, info["mean"], info["std"], eval_resize(name, img_size))
    return {path: extra_test_set(path, classes, transform) for path in paths}


def stored_dataset(name, data_dir, split, transform, download):
    """Any dataset but shapes, for split 'pretrain', 'train' or 'test'."""
    if not data_dir:
        raise DataError(f"{name} needs --data_dir: the folder that holds (or will hold) its files")
    if name in _TORCHVISION:
        return _torchvision_dataset(name, data_dir, split, transform, download)
    return _image_folder(data_dir, split, transform)


# ---- transforms (as the released code; README "Recipes") ----

DEFAULT_JITTER = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue


def blur_kernel_size(img_size):
    """About a tenth of the image, odd and at least 3 (3 at 32 px, 9 at 96 px, 23 at 224 px)."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


def pretrain_transform(img_size, mean, std, jitter=DEFAULT_JITTER, crop_scale=(0.08, 1.0)):
    """One random view for pretraining: both views of a pair use this (as the released code; solarisation p = 0)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(*jitter)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(blur_kernel_size(img_size), sigma=(0.1, 2.0))], p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class TwoViews:
    """img -> (view_a, view_b): the same random transform applied twice, two independent draws."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


def eval_resize(name, img_size):
    """The short side (px) a test image is resized to before its centre img_size × img_size crop.

    As the released code: ImageNet100 and ImageNet100-S resize to 256 at either size, so at 96 px the
    test view is the central 96 × 96 of a 256-px image, about 14 % of its area; STL10 resizes the whole
    (square) image to img_size. Our choices where the released code has no transfer protocol: square
    data (shapes, CIFAR) as STL10, the whole image; photos of any shape and size (flowers102, image
    folders such as the Backgrounds Challenge or iNaturalist) ImageNet's 224/256 crop at every size,
    which at 224 px is the released ImageNet view and at 96 px keeps ~77 % of the image.
    """
    if name == "imagenet100":
        return max(256, img_size)                # above 256 px: the whole short side, never padding
    if name in ("flowers102", "imagefolder"):
        return round(img_size * 256 / 224)       # 256 at 224 px, 110 at 96 px
    return img_size


def eval_transform(img_size, mean, std, resize=None):
    """The deterministic test view: resize the short side to `resize` (default img_size), centre crop
    img_size × img_size. With resize = img_size a square image is resized whole, as the released
    Resize((size, size)); eval_resize gives each dataset's `resize`. Bilinear, as the released code.
    """
    return transforms.Compose([
        transforms.Resize(resize or img_size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def linear_train_transform(img_size, mean, std):
    """The augmented linear probe's training views, as the released code: RandomResizedCrop (scale
    0.08–1, bilinear) and a horizontal flip, no colour changes (README "Recipes")."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


# ---- builders ----

def build_pretrain_dataset(name, data_dir, img_size, download=False, jitter=None, num_images=None, seed=0):
    """A dataset of ((view_a, view_b), label); label is -1 for unlabelled STL10 images.

    num_images: size of Shapes (default 4096), or keep only the first num_images of another dataset.
    seed: the Shapes generator seed, and the augmentation seed (SeededViews).
    """
    info = dataset_info(name)
    if name == "flowers102":
        raise DataError("flowers102 is a transfer (evaluation) dataset here; "
                        "pretrain on shapes, stl10, cifar10/100 or an image folder")
    jitter = info.get("jitter", DEFAULT_JITTER) if jitter is None else jitter
    crop_scale = info.get("crop_scale", (0.08, 1.0))
    views = TwoViews(pretrain_transform(img_size, info["mean"], info["std"], jitter, crop_scale))
    if name == "shapes":
        return SeededViews(Shapes("train", img_size, num_images or 4096, seed, transform=views), seed)
    dataset = stored_dataset(name, data_dir, "pretrain", views, download)
    return SeededViews(Subset(dataset, range(min(num_images, len(dataset)))) if num_images else dataset, seed)


def sample_seed(seed, epoch, index):
    """The torch seed of one image's random views (or of one GPU batch's): distinct for every (epoch, index)."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % 2 ** 64    # torch takes seeds below 2^64


class SeededViews(torch.utils.data.Dataset):
    """dataset[i], with its random augmentation drawn from a torch RNG seeded by (seed, epoch, i).

    So an image's views depend on nothing else: not on the worker that makes them, on how many images
    that worker made before, or on where the epoch started. A run stopped mid-epoch and resumed sees
    the very views the uninterrupted run saw. The epoch comes with each index from ResumableSampler:
    persistent loader workers keep the copy of this dataset they were started with, epoch and all.
    """

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        """key: an index i (this dataset's `epoch`), or (epoch, i) as ResumableSampler yields them."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        with torch.random.fork_rng(devices=[]):      # the caller's CPU RNG stream is left as it was
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))   # CPU only: ~1 µs
            return self.dataset[i]


def build_eval_datasets(name, data_dir, img_size, download=False, augment=False, seed=0, num_images=None):
    """(train_ds, test_ds, num_classes) for the linear probe and kNN, yielding (image, label).

    The test split always gets the dataset's test view (eval_transform with eval_resize: the released
    one for STL10 and ImageNet100(-S)); train gets it too with augment=False (cached features, kNN),
    linear_train_transform with augment=True. For shapes, train is the pretraining set (first
    num_images, default 4096) and test holds a quarter as many images from the disjoint test stream.
    """
    info = dataset_info(name)
    test_tf = eval_transform(img_size, info["mean"], info["std"], eval_resize(name, img_size))
    train_tf = linear_train_transform(img_size, info["mean"], info["std"]) if augment else test_tf
    if name == "shapes":
        n = num_images or 4096
        train = Shapes("train", img_size, n, seed, transform=train_tf)
        return train, Shapes("test", img_size, max(1, n // 4), seed, transform=test_tf), Shapes.num_classes
    train = stored_dataset(name, data_dir, "train", train_tf, download)
    test = stored_dataset(name, data_dir, "test", test_tf, download)
    # Folders: count the classes actually there (an ImageNet subset need not hold exactly 100).
    return train, test, info["num_classes"] if name in _TORCHVISION else len(train.classes)


def build_loader(dataset, batch_size, workers, shuffle=True, drop_last=True, seed=0):
    """A DataLoader over this rank's share of dataset; call loader.sampler.set_epoch(epoch) every epoch.

    Always a DistributedSampler (one replica without torch.distributed), so one code path serves one and
    many processes. drop_last=True (pretraining) gives every rank, every batch and every all-gather the
    same size; use drop_last=False for evaluation (the sampler then pads by repeating a few images).
    """
    distributed = dist.is_available() and dist.is_initialized()
    world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=drop_last)
    # Persistent workers, started once, not forked anew each epoch: the sampler hands them the epoch with
    # every index (SeededViews). Pretraining views are seeded per image; the workers' own seeds come from
    # this generator.
    generator = torch.Generator().manual_seed(seed + 100_003 * rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last, generator=generator,
                      persistent_workers=workers > 0)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way: `set_epoch(epoch, start)` skips the first
    `start` samples of this epoch's order without loading them (resuming after a mid-epoch stop)."""
    start = 0

    def set_epoch(self, epoch, start=0):
        """This epoch's order, and (a SeededViews dataset) its views; begin `start` samples in."""
        super().set_epoch(epoch)
        self.start = start
        if isinstance(self.dataset, SeededViews):
            self.dataset.epoch = epoch

    def __iter__(self):
        """This epoch's indices from `start` on; for a SeededViews dataset, (epoch, index) pairs."""
        order = itertools.islice(super().__iter__(), self.start, None)
        if isinstance(self.dataset, SeededViews):
            return ((self.epoch, i) for i in order)
        return order

    def __len__(self):
        return super().__len__() - self.start
