"""What several test files share: the tiny train.py run, tiny models, a free port, checkpoint comparison.

A plain module (pytest collects only test_*.py): test files take what they need with `from helpers import X`.
Two conftest.py files (the repository's and this folder's) would make `from conftest import X` depend on
which one pytest imported last, so the helpers live here instead.
"""
import json
import os
import socket
import types

import pytest
import torch
import torch.nn as nn

import recipes
import train
from adios import ADIOS
from masker import Masker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the repository root
TESTS = os.path.join(REPO, "tests")
CPU = torch.device("cpu")

# train.py's shared tiny configuration: 32 images of 32 px, batch 8 (4 steps an epoch), small heads and masker.
TINY = ["--num_images", "32", "--batch_size", "8", "--workers", "0", "--proj_hidden_dim", "32",
        "--proj_output_dim", "16", "--pred_hidden_dim", "16", "--mask_channels", "8", "--device", "cpu"]

# bench.py's tiny configuration (test_bench.py, test_bench_world.py).
BENCH_TINY = ["--device", "cpu", "--threads", "1", "--img_size", "32", "--batch_size", "8", "--num_masks", "2",
              "--mask_channels", "8", "--proj_hidden_dim", "32", "--proj_output_dim", "16", "--pred_hidden_dim", "16"]


def free_port():
    """One free localhost port (for gloo processes and torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(out):
    """The lines of a run folder's log.jsonl, as dicts."""
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---- train.main on TINY (test_cli_checks.py, test_checkpoint.py) -------------------------------------

def run(out, *flags):
    return train.main([*TINY, "--output_dir", str(out), *flags])


def ckpt(out, name="checkpoint.pth"):
    return torch.load(out / name, weights_only=True)


def bad_input(capsys, tmp_path, *flags):
    """train.main on TINY + flags must exit 2 with one line on stderr and no traceback; returns the line."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "out", *flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error: "), err
    return err


def assert_identical(a, b, where="checkpoint"):
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def worker_pid(parent, rank):
    """The pid of the child of `parent` (torchrun) whose environment holds RANK=rank, found through /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])     # the name in (...) may hold spaces
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:                                                  # exited meanwhile
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


# ---- tiny models (float64) ---------------------------------------------------------------------------

def tiny_encoder(feat_dim=16):
    """A small conv net with BatchNorm (per-slot statistics and running buffers matter here)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, feat_dim, 3, stride=2, padding=1), nn.BatchNorm2d(feat_dim), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_adios(method="simclr", num_masks=3, img=16, **kw):
    """ADIOS in float64 on 16-px images: encoder 16 features, heads 32 → 8, masker base width 8."""
    torch.manual_seed(0)
    masker = Masker(num_masks, img, base_channels=8) if num_masks else None
    return ADIOS(tiny_encoder(), 16, masker, method=method, proj_hidden_dim=32, proj_output_dim=8,
                 pred_hidden_dim=12, **kw).double()


def views(B=6, img=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, B, 3, img, img, generator=g, dtype=torch.float64).unbind(0)


def parsed(*flags):
    """train.py's resolved arguments for TINY + flags (nothing built, nothing run)."""
    return recipes.parse_args([*TINY, *flags])


def opt_args(method, **kw):
    """The arguments optim.build_optimizers reads (as train.py resolves them)."""
    return types.SimpleNamespace(**{**dict(method=method, lr=0.4, mask_lr=0.05, weight_decay=1e-4,
                                           classifier_lr=0.1, optimizer="lars", mask_type="adios"), **kw})
