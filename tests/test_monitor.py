"""--tensorboard (monitor.Curves): the event files hold the run's scalars and mask pictures, a resumed run
continues the same curves without drawing a step twice, and without the tensorboard package the flag is
refused in one line while train.py runs as before."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import train
from helpers import REPO, TINY, bad_input

SMALL = [*TINY, "--img_size", "16", "--num_masks", "2"]       # 4 steps an epoch


def curves(folder):
    """{tag: [(step, value)]} of every scalar, and {tag: [step]} of every image, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    return scalars, {t: [e.step for e in events.Images(t)] for t in events.Tags()["images"]}


def test_tensorboard_holds_the_scalars_and_the_picture_and_a_resume_continues_them(tmp_path):
    out = tmp_path / "run"
    train.main([*SMALL, "--output_dir", str(out), "--epochs", "1", "--tensorboard"])
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out)) as stale:                     # what a crash after the checkpoint left behind
        stale.add_scalar("train/enc_ssl_loss", 999.0, 6)
    train.main([*SMALL, "--output_dir", str(out), "--epochs", "2", "--tensorboard"])
    scalars, images = curves(out)
    for tag in ("train/enc_ssl_loss", "train/enc_penalty", "train/enc_area_0", "train/mask_ssl_loss", "lr/lr",
                "lr/mask_lr"):
        assert [s for s, _ in scalars[tag]] == list(range(1, 9)), tag     # every step once (CPU: a check a step)
    assert all(v != 999.0 for _, v in scalars["train/enc_ssl_loss"])
    for tag in ("epoch/online_top1", "epoch/mask_ari", "epoch/mask_ari_fg", "epoch/images_per_s"):
        assert [s for s, _ in scalars[tag]] == [4, 8], tag
    assert images["masks"] == [4, 8]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert scalars["lr/lr"][0][1] == pytest.approx(0.003)      # the warmup's first rate, at step 1


def test_tensorboard_averages_between_checks(tmp_path):
    out = tmp_path / "run"
    log = train.main([*SMALL, "--output_dir", str(out), "--epochs", "1", "--log_every", "2", "--tensorboard"])
    scalars, _ = curves(out)
    steps, values = zip(*scalars["train/enc_ssl_loss"])
    assert steps == (2, 4)
    assert sum(values) / 2 == pytest.approx(log["enc_ssl_loss"], rel=1e-5)   # two halves of the epoch's mean


def test_tensorboard_flag_refused_in_one_line_without_the_package(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    line = bad_input(capsys, tmp_path, "--tensorboard")
    assert "--tensorboard" in line and "pip install tensorboard" in line
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_train_py_never_needs_tensorboard(tmp_path):
    """With tensorboard unimportable, a plain run trains, logs and saves as before."""
    script = (f"import sys; sys.modules['tensorboard'] = None; sys.path.insert(0, {REPO!r}); import train; "
              f"train.main({[*SMALL, '--output_dir', str(tmp_path / 'run'), '--max_steps', '2']!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["step"] == 2
    assert not any(name.startswith("events.out") for name in os.listdir(tmp_path / "run"))
