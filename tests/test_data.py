"""Tests for data.py: CPU only, never touch the network (no test passes download=True)."""
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import data
from shapes import SHAPE_CLASSES

torch.set_num_threads(1)


# ---- shapes ----

def test_shapes_deterministic():
    a, b = data.Shapes("train"), data.Shapes("train")
    for i in (0, 7, 4095):
        img_a, label_a = a[i]
        img_b, label_b = b[i]
        assert img_a.size == (32, 32) and img_a.mode == "RGB"
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b)) and label_a == label_b
        assert np.array_equal(a.object_map(i), b.object_map(i))
    assert not np.array_equal(a.render(0)[0], data.Shapes("train", seed=1).render(0)[0])


def test_shapes_train_test_disjoint():
    train, test = data.Shapes("train"), data.Shapes("test")
    train_bytes = {train.render(i)[0].tobytes() for i in range(200)}
    test_bytes = {test.render(i)[0].tobytes() for i in range(200)}
    assert len(train_bytes) == 200 and len(test_bytes) == 200
    assert not train_bytes & test_bytes


def test_shapes_label_is_largest_visible_object():
    shapes = data.Shapes("train")
    for i in range(100):
        _, object_map, kinds = shapes.render(i)
        ids, counts = np.unique(object_map[object_map > 0], return_counts=True)
        assert shapes[i][1] == kinds[ids[counts.argmax()] - 1] == shapes.label(i)


def test_object_map():
    """Every image: a large object (1) with a smaller distractor (2) drawn over it, near-grey on the other side
    of mid-grey from a flat grey background that stays visible."""
    shapes = data.Shapes("test", img_size=48)
    for i in range(100):
        img, object_map, _ = shapes.render(i)
        assert object_map.dtype == np.int64 and object_map.shape == (48, 48)
        assert set(np.unique(object_map)) == {0, 1, 2}
        assert (object_map == 1).sum() > (object_map == 2).sum()       # the large one keeps the most pixels
        assert (object_map == 0).mean() > 0.2                           # background stays visible
        touching = np.zeros_like(object_map, dtype=bool)                # pixels next to the large object
        big = object_map == 1
        touching[1:] |= big[:-1]; touching[:-1] |= big[1:]; touching[:, 1:] |= big[:, :-1]; touching[:, :-1] |= big[:, 1:]
        assert (touching & (object_map == 2)).any()                     # the distractor lies over it
        background, large = img[object_map == 0] / 255, img[object_map == 1] / 255     # (P, 3) each
        assert background.std() < 0.05                                  # flat: only the pixel noise
        assert (background.mean() - 0.5) * (large.mean() - 0.5) < 0     # opposite sides of mid-grey


def test_shapes_classes_balanced_and_fast():
    shapes = data.Shapes("train")
    assert shapes.num_classes == 4 and shapes.classes == SHAPE_CLASSES
    labels = np.array([shapes.label(i) for i in range(400)])
    assert np.bincount(labels, minlength=4).min() > 60  # every class is common
    start = time.perf_counter()
    for i in range(200):
        shapes.render(i)
    assert (time.perf_counter() - start) / 200 < 5e-3  # ~0.3 ms measured; loose for a busy machine


# ---- builders and transforms ----

def test_pretrain_dataset_two_views():
    dataset = data.build_pretrain_dataset("shapes", None, 32, num_images=8)
    assert len(dataset) == 8
    (view_a, view_b), label = dataset[3]
    assert view_a.shape == view_b.shape == (3, 32, 32) and view_a.dtype == torch.float32
    assert not torch.equal(view_a, view_b)
    assert 0 <= label < 4


def test_each_view_draws_its_own_crop(monkeypatch):
    # The two views are two independent draws of the whole pipeline (Sec. 2; SimCLR), the crop included.
    crops = []
    real = transforms.RandomResizedCrop.get_params
    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params",
                        staticmethod(lambda *a: crops.append(real(*a)) or crops[-1]))
    dataset = data.build_pretrain_dataset("shapes", None, 32, num_images=4)
    for i in range(4):
        dataset[i]
    assert len(crops) == 8 and all(crops[2 * i] != crops[2 * i + 1] for i in range(4))


def test_eval_datasets_shapes():
    train, test, num_classes = data.build_eval_datasets("shapes", None, 24, num_images=16)
    assert (len(train), len(test), num_classes) == (16, 4, 4)
    x, _ = test[0]
    assert x.shape == (3, 24, 24)
    assert torch.equal(test[0][0], test[0][0])  # the eval transform is deterministic
    train_aug, _, _ = data.build_eval_datasets("shapes", None, 24, augment=True, num_images=16)
    assert train_aug[0][0].shape == (3, 24, 24)


def test_blur_kernel_size():
    assert [data.blur_kernel_size(s) for s in (32, 96, 224)] == [3, 9, 23]


def test_unknown_name():
    with pytest.raises(data.DataError, match="choose one of"):
        data.dataset_info("mnist")
    with pytest.raises(data.DataError):
        data.build_pretrain_dataset("mnist", "/nonexistent", 32)


@pytest.mark.parametrize("name", ["stl10", "cifar10", "cifar100", "flowers102"])
def test_absent_torchvision_dataset(tmp_path, name):
    with pytest.raises(data.DataError) as err:
        data.build_eval_datasets(name, str(tmp_path), 32)
    message = str(err.value)
    assert "\n" not in message and name in message and str(tmp_path) in message and "--download" in message
    if name != "flowers102":
        with pytest.raises(data.DataError):
            data.build_pretrain_dataset(name, str(tmp_path), 32)


def test_corrupt_torchvision_dataset(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # the folder is there, its files are not
    with pytest.raises(data.DataError, match="incomplete or corrupt"):
        data.build_pretrain_dataset("cifar10", str(tmp_path), 32)


def _image_folder(root, classes=("cat", "dog"), splits=("train", "val"), per_class=2):
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (20, 12), (40 * j, 90, 200)).save(root / split / c / f"{j}.png")
    return root


def test_check_image_folder(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.check_image_folder(str(tmp_path / "missing"))
    root = _image_folder(tmp_path / "no_val", splits=("train",))
    with pytest.raises(data.DataError, match="no val/"):
        data.check_image_folder(str(root))
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no train/"):
        data.check_image_folder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(data.DataError, match="no class folders"):
        data.check_image_folder(str(tmp_path / "empty"))
    root = _image_folder(tmp_path / "no_images")
    (root / "val" / "dog" / "0.png").unlink()
    (root / "val" / "dog" / "1.png").unlink()
    (root / "val" / "dog" / "notes.txt").write_text("no image here")
    with pytest.raises(data.DataError, match="holds no images"):
        data.check_image_folder(str(root))
    root = _image_folder(tmp_path / "mismatch")
    (root / "val" / "dog").rename(root / "val" / "fox")
    with pytest.raises(data.DataError, match="different class folders"):
        data.check_image_folder(str(root))
    assert data.check_image_folder(str(_image_folder(tmp_path / "good"))) == ["cat", "dog"]


def test_image_folder_datasets(tmp_path):
    root = str(_image_folder(tmp_path / "folder"))
    train, test, num_classes = data.build_eval_datasets("imagefolder", root, 16)
    assert (len(train), len(test), num_classes) == (4, 4, 2)
    assert train[0][0].shape == (3, 16, 16)
    (view_a, view_b), label = data.build_pretrain_dataset("imagenet100", root, 16)[3]
    assert view_a.shape == (3, 16, 16) and label == 1


def test_find_bad_images(tmp_path):
    root = _image_folder(tmp_path / "folder")
    assert data.find_bad_images(str(root)) == 8
    assert data.find_bad_images(str(root), limit=3) == 3
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(data.DataError, match="broken.jpg"):
        data.find_bad_images(str(root))
    (root / "train" / "dog" / "broken.jpg").unlink()
    # A JPEG cut short passes PIL's verify(); the missing end marker sends it to a full decode.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    noise.save(root / "train" / "cat" / "whole.jpg")
    assert data.find_bad_images(str(root)) == 9
    whole = (root / "train" / "cat" / "whole.jpg").read_bytes()
    (root / "train" / "cat" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.DataError, match="cut.jpg.*truncated"):
        data.find_bad_images(str(root))


def test_build_loader_drop_last():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    loader = data.build_loader(dataset, batch_size=4, workers=0, seed=3)
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
    batches = [b[0] for b in loader]
    assert [len(b) for b in batches] == [4, 4]
    loader.sampler.set_epoch(1)
    assert not torch.equal(torch.cat(batches), torch.cat([b[0] for b in loader]))  # new order each epoch
    loader = data.build_loader(dataset, batch_size=4, workers=0, shuffle=False, drop_last=False)
    assert torch.equal(torch.cat([b[0] for b in loader]), torch.arange(10))


def epoch_views(loader, epoch, start=0):
    """Every (view_a, view_b) pair of one epoch (from `start` samples in), stacked: (2, images, 3, H, W)."""
    loader.sampler.set_epoch(epoch, start=start)
    return torch.cat([torch.stack([x_a, x_b]) for (x_a, x_b), _ in loader], dim=1)


def test_persistent_workers_show_new_views_every_epoch():
    # Two workers started once (persistent): they keep their copy of the dataset, so the epoch must come
    # with the indices. Each epoch's views are new, and bit-identical to those made in this process.
    dataset = data.build_pretrain_dataset("shapes", None, 16, num_images=8)
    workers = data.build_loader(dataset, batch_size=4, workers=2, seed=3)
    here = data.build_loader(dataset, batch_size=4, workers=0, seed=3)
    assert workers.persistent_workers
    first = epoch_views(workers, 0)
    started = workers._iterator
    second = epoch_views(workers, 1)
    assert workers._iterator is started                           # the same workers served both epochs
    assert not torch.equal(first, second)                         # new views in the new epoch
    assert torch.equal(first, epoch_views(here, 0)) and torch.equal(second, epoch_views(here, 1))
    assert torch.equal(epoch_views(workers, 1, start=4), second[:, 4:])   # a resumed epoch: the same views


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)  # never online
    with pytest.raises(data.DataError, match="download into") as err:
        data.build_pretrain_dataset("cifar10", str(tmp_path), 32, download=True)
    assert "\n" not in str(err.value) and "by hand" in str(err.value)


# ---- the test view of each dataset (the released transforms, and ours where it has none) ----

def test_imagenet_std_is_the_released_value():
    assert data.IMAGENET_STD == (0.228, 0.224, 0.225)          # not torchvision's 0.229
    assert data.dataset_info("imagenet100")["std"] == data.dataset_info("imagefolder")["std"] == data.IMAGENET_STD


class _Stored:
    """Stands in for a stored dataset (no files here): keeps the transform build_eval_datasets gives it."""
    classes = ["a", "b"]

    def __init__(self, transform):
        self.transform = transform


def _test_view(monkeypatch, name, size):
    """The transform build_eval_datasets gives the test split of `name` at `size` px."""
    monkeypatch.setattr(data, "stored_dataset", lambda name, data_dir, split, transform, download: _Stored(transform))
    train, test, _ = data.build_eval_datasets(name, "unused", size, num_images=4)
    assert train.transform is test.transform                  # cached features: train images get it too
    return test.transform


def _surviving_box(transform, name, width, height):
    """The part of a width × height image the transform keeps, (left, right, top, bottom) in source pixels,
    read from an image whose red channel is its column and green channel its row (≤ 256 px): the output's
    first and last pixel centres, widened by half an output pixel each side."""
    xx, yy = np.meshgrid(np.arange(width), np.arange(height))
    pil = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8))
    info = data.dataset_info(name)
    out = transform(pil)                                      # (3, S, S), normalised
    codes = out * torch.tensor(info["std"]).view(3, 1, 1) + torch.tensor(info["mean"]).view(3, 1, 1)
    codes = codes * 255 + 0.5                                 # source coordinate of each output pixel centre
    box = []
    for channel in (0, 1):
        first, last = codes[channel].min().item(), codes[channel].max().item()
        half_pixel = (last - first) / (out.shape[-1] - 1) / 2
        box += [first - half_pixel, last + half_pixel]
    return box


@pytest.mark.parametrize("name, size, kept", [
    ("imagenet100", 96, 96 / 256),       # ImageNet100-S, as released: the central 96 of 256 px, ~14 % of the area
    ("imagenet100", 224, 224 / 256),     # ImageNet100, as released: the central 224 of 256 px
    ("imagefolder", 96, 224 / 256),      # photos (ours): ImageNet's 224/256 at every size
    ("flowers102", 96, 224 / 256),
    ("stl10", 96, 1.0),                  # square data: the whole image, as released for STL10
    ("cifar10", 96, 1.0),                # CIFAR transfer to a 96-px encoder: the whole image, resized
    ("cifar100", 32, 1.0),
])
def test_test_view_keeps_the_released_pixels(monkeypatch, name, size, kept):
    transform = _test_view(monkeypatch, name, size)
    assert transform(Image.new("RGB", (240, 180))).shape == (3, size, size)
    left, right, top, bottom = _surviving_box(transform, name, 240, 240)
    side = 240 * kept                                         # the square's kept side, centred
    for lo, hi in ((left, right), (top, bottom)):
        assert lo == pytest.approx(120 - side / 2, abs=1.5) and hi == pytest.approx(120 + side / 2, abs=1.5)
    if name == "imagenet100" and size == 96:
        assert (right - left) * (bottom - top) / 240 ** 2 == pytest.approx(0.14, abs=0.005)
    # A wide image keeps the same share of its height and the centre of its width: never stretched.
    left, right, top, bottom = _surviving_box(transform, name, 240, 120)
    assert bottom - top == pytest.approx(120 * kept, abs=2.5) and right - left == pytest.approx(120 * kept, abs=2.5)
    assert (left + right) / 2 == pytest.approx(120, abs=1)


def test_square_view_is_the_released_stl10_resize(monkeypatch):
    # STL10 as released: transforms.Resize((96, 96)), bilinear: the same pixels, whatever the source size.
    released = transforms.Compose([transforms.Resize((96, 96)), transforms.ToTensor(),
                                   transforms.Normalize(data.CIFAR_MEAN, data.CIFAR_STD)])
    ours = _test_view(monkeypatch, "stl10", 96)
    rng = np.random.default_rng(0)
    for side in (96, 64, 32):
        pil = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        torch.testing.assert_close(ours(pil), released(pil))


def test_shapes_test_view_is_the_whole_image():
    _, test, _ = data.build_eval_datasets("shapes", None, 32, num_images=8)
    img, _ = data.Shapes("test", 32, 2)[0]
    pixels = transforms.Normalize(data.SHAPES_MEAN, data.SHAPES_STD)(transforms.ToTensor()(img))
    torch.testing.assert_close(test[0][0], pixels)           # every pixel, unchanged


def test_linear_train_view_is_the_released_one(monkeypatch):
    monkeypatch.setattr(data, "stored_dataset", lambda name, data_dir, split, transform, download: _Stored(transform))
    train, test, _ = data.build_eval_datasets("stl10", "unused", 96, augment=True)
    crop, flip = train.transform.transforms[:2]
    assert isinstance(crop, transforms.RandomResizedCrop) and isinstance(flip, transforms.RandomHorizontalFlip)
    assert crop.size == (96, 96) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == transforms.InterpolationMode.BILINEAR
    assert train.transform is not test.transform and test.transform.transforms[1].size == (96, 96)


# ---- extra test folders (eval_linear.py --test_dirs) ----

def test_test_folder_layouts_and_labels(tmp_path):
    classes = ["00_dog", "01_bird", "02_wheeled vehicle"]    # Backgrounds Challenge names, a space included
    release = _image_folder(tmp_path / "bg_challenge" / "mixed_rand", classes=classes, splits=("val",), per_class=3)
    flat = tmp_path / "flat"                                  # <class>/<image>, and only two of the classes
    for c in classes[1:]:
        (flat / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(flat / c / "0.png")
    found = data.build_test_folders("imagefolder", [str(release), str(flat)], classes, 16)
    mixed, only_two = found[str(release)], found[str(flat)]
    assert len(mixed) == 9 and mixed[0][0].shape == (3, 16, 16)
    assert sorted(mixed.targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert only_two.targets == [1, 2] and only_two.classes == classes   # labels by name, not by position


def test_test_folder_errors_are_one_line(tmp_path):
    classes = ["cat", "dog"]
    _image_folder(tmp_path / "other", classes=("cat", "fox"), splits=("val",))
    with pytest.raises(data.DataError) as err:
        data.extra_test_set(str(tmp_path / "other"), classes, None)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "other") in message and "fox" in message
    assert "name its class folders as the training folder's (cat, dog)" in message
    with pytest.raises(data.DataError, match="does not exist"):
        data.extra_test_set(str(tmp_path / "missing"), classes, None)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(data.DataError, match="holds no images"):
        data.extra_test_set(str(tmp_path / "empty"), classes, None)
