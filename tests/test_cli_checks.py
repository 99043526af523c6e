"""Tests of cli_checks.py through the entry points: bad input to train.py, bench.py and eval_linear.py is
answered in one line before any work (exit 2, no traceback). CPU, on test_train's tiny shapes configuration
(helpers.TINY: 32 images, batch 8, 4 steps an epoch).
"""
import io
import os
import urllib.error
import urllib.request

import pytest
from PIL import Image

from helpers import bad_input


# ---- bad input: exit 2, one line, before any work ----

@pytest.mark.parametrize("flag, value", [("--dataset", "mnist"), ("--arch", "resnet34"), ("--method", "moco"),
                                         ("--mask_type", "grid")])
def test_unknown_choice(capsys, tmp_path, flag, value):
    err = bad_input(capsys, tmp_path, flag, value)
    assert value in err and flag.lstrip("-") in err


@pytest.mark.parametrize("flags, says", [(["--img_size", "36"], "multiple of 8"),              # the U-Net
                                         (["--arch", "vit_tiny", "--img_size", "40"], "multiple of 16"),
                                         (["--img_size", "0"], "--img_size")])
def test_image_size_the_models_cannot_take(capsys, tmp_path, flags, says):
    assert says in bad_input(capsys, tmp_path, *flags)


@pytest.mark.parametrize("n", ["1", "-2"])
def test_num_masks_one_or_negative(capsys, tmp_path, n):
    assert f"--num_masks {n}" in bad_input(capsys, tmp_path, "--num_masks", n)


@pytest.mark.parametrize("device, says", [("tpu", "not a device name"), ("mps", "only cpu and cuda"),
                                          ("cuda:99", "cuda:99")])
def test_device_this_machine_cannot_open(capsys, tmp_path, device, says):
    assert says in bad_input(capsys, tmp_path, "--device", device)


@pytest.mark.parametrize("script, argv, says", [
    ("bench", ["--steps", "0"], "--steps 0"),
    ("bench", ["--num_masks", "0"], "--num_masks"),
    ("bench", ["--device", "cuda:99"], "cuda:99"),
    ("bench", ["--arch", "resnet34"], "--arch"),
    ("eval_linear", ["--random_init"], "--arch"),
    ("eval_linear", ["--ckpt", "x.pth", "--device", "cuda:99"], "cuda:99"),
    ("eval_linear", ["--bogus"], "--bogus"),
    ("eval_linear", ["--random_init", "--arch", "resnet18", "--img_size", "0"], "--img_size 0"),
    ("eval_linear", ["--random_init", "--arch", "resnet18", "--batch_size", "0"], "--batch_size 0"),
    ("eval_linear", ["--random_init", "--arch", "resnet18", "--lr", "-1"], "--lr -1")])
def test_bench_and_eval_answer_bad_input_in_one_line(capsys, script, argv, says):
    main = __import__(script).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{script}.py: error: ") and says in err, err


@pytest.mark.parametrize("flags, says", [
    (["--workers", "-1"], "--workers -1"), (["--epochs", "0"], "--epochs 0"), (["--num_images", "0"], "--num_images 0"),
    (["--max_steps", "0"], "--max_steps 0"), (["--proj_hidden_dim", "0"], "--proj_hidden_dim 0"),
    (["--save_every", "-1"], "--save_every -1"), (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--mask_lr", "-0.1"], "--mask_lr"), (["--temperature", "0"], "--temperature"), (["--alpha", "-1"], "--alpha"),
    (["--jitter", "0.4", "0.4", "0.4", "0.8"], "hue's at most 0.5"), (["--mask_channels", "0"], "at least 1"),
    (["--alpha_entropy", "-0.5"], "--alpha_entropy -0.5"), (["--mask_blocks", "1"], "at least 2 blocks"),
    (["--mask_blocks", "7"], "multiple of 64"), (["--epochs", "2", "--encoder_early_end", "2"], "--encoder_early_end 2")])
def test_counts_and_rates_out_of_range(capsys, tmp_path, flags, says):
    assert says in bad_input(capsys, tmp_path, *flags)


def test_batch_too_small_for_a_process(capsys, tmp_path):
    # --batch_size is per process; BatchNorm and the contrastive loss need two images on each one.
    assert "at least 2 images per process" in bad_input(capsys, tmp_path, "--batch_size", "1")


def test_batch_larger_than_the_dataset(capsys, tmp_path):
    assert "exceeds the 32 training images" in bad_input(capsys, tmp_path, "--batch_size", "40")


def tiny_image_folder(root, splits=("train", "val")):
    for split in splits:
        for c, colour in (("cat", "red"), ("dog", "blue")):
            os.makedirs(root / split / c)
            for i in range(2):
                Image.new("RGB", (8, 8), colour).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("layout, says", [("missing", "does not exist"), ("empty", "has no train/ folder"),
                                          ("no_val", "has no val/ folder")])
def test_image_folder_missing_empty_or_incomplete(capsys, tmp_path, layout, says):
    root = tmp_path / layout
    if layout == "empty":
        root.mkdir()
    elif layout == "no_val":
        tiny_image_folder(root, splits=("train",))
    err = bad_input(capsys, tmp_path, "--dataset", "imagefolder", "--img_size", "32", "--data_dir", str(root))
    assert says in err and str(root) in err


@pytest.mark.parametrize("name, content", [("broken.jpg", b"these are not JPEG bytes"),
                                           ("cut.png", "half of a PNG")])
def test_corrupt_image_is_named(capsys, tmp_path, name, content):
    root = tiny_image_folder(tmp_path / "images")
    path = root / "train" / "dog" / name
    if content == "half of a PNG":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "green").save(buf, format="PNG")
        content = buf.getvalue()[:len(buf.getvalue()) // 2]
    path.write_bytes(content)
    err = bad_input(capsys, tmp_path, "--dataset", "imagefolder", "--img_size", "32", "--data_dir", str(root))
    assert str(path) in err


def test_stl10_absent_without_download(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = bad_input(capsys, tmp_path, "--dataset", "stl10", "--data_dir", str(tmp_path / "empty"))
    assert "--download" in err and "by hand" in err and str(tmp_path / "empty" / "stl10_binary") in err


def test_download_that_fails_offline(capsys, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)          # never touch the network
    err = bad_input(capsys, tmp_path, "--dataset", "cifar10", "--download", "--data_dir", str(tmp_path / "d"))
    assert "download" in err and "failed" in err and "URLError" in err
    assert "by hand" in err and str(tmp_path / "d" / "cifar-10-batches-py") in err


def test_output_dir_that_cannot_be_written(capsys, tmp_path):
    (tmp_path / "a_file").write_text("")              # a directory below a file: fails even for root
    assert "cannot be written" in bad_input(capsys, tmp_path, "--output_dir", str(tmp_path / "a_file" / "run"))
