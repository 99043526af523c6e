"""Tests for data.py: CPU only, never touch the network (no test passes download=True)."""
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import data

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
    shapes = data.Shapes("test", img_size=48)
    seen = set()
    for i in range(100):
        object_map = shapes.object_map(i)
        assert object_map.dtype == np.int64 and object_map.shape == (48, 48)
        objects = set(np.unique(object_map)) - {0}
        assert 1 <= len(objects) <= 3 and objects <= {1, 2, 3}
        assert (object_map == 0).mean() > 0.2  # background stays visible
        seen.add(len(objects))
    assert seen == {1, 2, 3}


def test_shapes_classes_balanced_and_fast():
    shapes = data.Shapes("train")
    assert shapes.num_classes == 4 and shapes.classes == data.SHAPE_CLASSES
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


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)  # never online
    with pytest.raises(data.DataError, match="download into") as err:
        data.build_pretrain_dataset("cifar10", str(tmp_path), 32, download=True)
    assert "\n" not in str(err.value) and "by hand" in str(err.value)
