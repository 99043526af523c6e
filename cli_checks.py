"""Bad command-line input, answered in one line before any work starts.

train.py, eval_linear.py and bench.py share these checks (bench.py builds train.py's models). Each returns the line that names the flag and
the fix, or None; the entry point prints it under its own name with `fail` (exit code 2), never as a
traceback from inside torch. README: "When things go wrong".
"""
import argparse
import importlib.util
import os
import sys
import tempfile

import torch

import data
from encoders import build_encoder
from masker import check_masker_args


def fail(prog, message):
    """One line on stderr, `prog: error: message`, and exit code 2 (argparse's own convention)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (it would print the usage first)."""

    def error(self, message):
        fail(self.prog, message)


def device_problem(name):
    """Why --device `name` cannot be used on this machine, or None if it can (None = automatic)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name}: not a device name; use cpu, cuda or cuda:K"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: only cpu and cuda are supported"
    if device.type == "cuda" and not torch.cuda.is_available():
        return (f"--device {name}: this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                "use --device cpu, or install a CUDA build of torch")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        return f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def below_minimum(args, minimums):
    """The first flag under its minimum ({flag: least}; a flag left None is skipped), or None."""
    for flag, least in minimums.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            return f"--{flag} {value}: must be at least {least}"
    return None


def output_dir_problem(path):
    """Why --output_dir cannot hold a run's files, or None (the folder is made if need be)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as f:          # a unique name: every rank probes at once
            f.write(b"ok")
    except OSError as e:
        return f"--output_dir {path} cannot be written ({e.strerror}): choose another directory"
    return None


def train_args_problem(args):
    """What train.py (and bench.py, which builds the same models) cannot run with, or None.

    `args` are train.py's resolved arguments: every count, rate and size the models are built from.
    """
    if problem := device_problem(args.device):
        return problem
    if args.num_masks < 0 or args.num_masks == 1 and args.mask_type == "adios":
        return (f"--num_masks {args.num_masks}: N must be 0 (the plain base method) or at least 2 "
                "(one slot would hide the whole image)")
    if args.dataset not in data.DATASETS or args.dataset == "flowers102":
        return (f"--dataset {args.dataset!r} is not a pretraining dataset: choose shapes, stl10, cifar10, "
                "cifar100, imagenet100 or imagefolder")
    if args.img_size <= 0:
        return f"--img_size {args.img_size}: must be a positive number of pixels"
    if args.mask_type == "adios" and args.num_masks >= 2:
        try:
            check_masker_args(args.num_masks, args.img_size, args.mask_channels, args.mask_norm, args.mask_blocks)
        except ValueError as e:
            return f"--img_size/--num_masks/--mask_channels/--mask_blocks: {e}"
    try:
        build_encoder(args.arch, args.img_size, args.stem)
    except ValueError as e:
        return f"--arch {args.arch} / --img_size {args.img_size}: {e}"
    if args.batch_size < 2:
        return f"--batch_size {args.batch_size}: contrastive losses need at least 2 images per process"
    if getattr(args, "tensorboard", False) and importlib.util.find_spec("tensorboard") is None:
        return "--tensorboard needs the tensorboard package: pip install tensorboard (or leave out --tensorboard)"
    if not 0 <= args.seed < 2 ** 63:
        return f"--seed {args.seed}: must be from 0 to 2^63 − 1 ({2 ** 63 - 1})"
    # Counts and rates out of range: named here rather than met later as a shape error or a NaN.
    if problem := below_minimum(args, dict(epochs=1, num_images=1, max_steps=1, proj_hidden_dim=1, pred_hidden_dim=1,
                                           proj_output_dim=1, warmup_epochs=0, save_every=0, workers=0, log_every=1,
                                           collective_timeout=0.1)):
        return problem
    if not 0 <= args.encoder_early_end < args.epochs:
        return (f"--encoder_early_end {args.encoder_early_end}: must be at least 0 and below --epochs "
                f"{args.epochs} (the encoder's schedule spans epochs − encoder_early_end)")
    for flag, positive in (("lr", True), ("mask_lr", True), ("temperature", True), ("weight_decay", False),
                           ("alpha", False), ("alpha_entropy", False), ("classifier_lr", False)):
        value = getattr(args, flag)
        if value < 0 or positive and value == 0:
            return f"--{flag} {value}: must be {'positive' if positive else 'at least 0'}"
    if args.jitter is not None and (min(args.jitter) < 0 or args.jitter[3] > 0.5):
        return f"--jitter {' '.join(map(str, args.jitter))}: strengths must be at least 0, and hue's at most 0.5"
    return None


def eval_args_problem(args):
    """What eval_linear.py cannot run with, or None. `args`: its parsed arguments."""
    if args.random_init == (args.ckpt is not None):
        return "give exactly one of --ckpt and --random_init"
    if args.random_init and args.arch is None:
        return "--random_init needs --arch (e.g. --arch resnet18 --img_size 32 --stem standard)"
    if problem := device_problem(args.device) or below_minimum(args, dict(
            epochs=0, batch_size=1, img_size=1, num_images=1, mask_images=0, workers=0)):
        return problem
    if args.lr <= 0:
        return f"--lr {args.lr}: must be positive"
    if args.test_dirs and args.dataset not in ("imagefolder", "imagenet100"):
        return (f"--test_dirs needs a probe trained on an image folder: use --dataset imagefolder (or "
                f"imagenet100) with --data_dir holding train/ and val/, not --dataset {args.dataset}")
    if args.test_dirs and len(set(args.test_dirs)) < len(args.test_dirs):
        return f"--test_dirs {' '.join(args.test_dirs)}: a folder is named twice; name each once"
    return None
