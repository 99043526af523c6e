"""What bench.py's modes build and how they time it: both sides of the benchmark from train.py's arguments
(run_setup.build_model, optim.build_optimizers), and the clock. README: "Performance".
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import cli_checks
import optim
import recipes
import run_setup
from optim import set_learning_rates


def fail(message):
    cli_checks.fail("bench.py", message)


# ---- building both sides ------------------------------------------------------------------------

def train_args(a, device):
    """train.py's arguments for this benchmark: its parser and recipe, then what train.main sets."""
    argv = ["--dataset", a.dataset, "--arch", a.arch, "--method", a.method, "--device", device.type]
    for key in ("img_size", "stem", "batch_size", "num_masks", "mask_channels", "proj_hidden_dim", "proj_output_dim",
                "pred_hidden_dim"):
        if getattr(a, key) is not None:
            argv += [f"--{key}", str(getattr(a, key))]
    argv += ["--log_every", str(a.log_every)] if getattr(a, "log_every", None) else []
    args = recipes.resolve_args(recipes.get_args_parser().parse_args(argv))
    if problem := cli_checks.train_args_problem(args):      # what cannot be built: one line, exit 2
        fail(problem)
    if args.num_masks < 2:
        fail("--num_masks must be at least 2: the two schedules differ in how they run the slots")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    args.precision = a.precision or ("bf16" if bf16 else "fp32")
    args.channels_last = device.type == "cuda" if a.channels_last is None else a.channels_last
    args.compile = a.compile
    return args


def build_side(args, device, num_classes, world=1):
    """(model, encoder optimiser, masker optimiser) as train.main builds them, at the warmup's first rate
    (0.003), so that the weights stay sane over the benchmark's few dozen steps."""
    model = run_setup.build_model(args, num_classes=num_classes, world=world, device=device)
    opt_enc, opt_mask = optim.build_optimizers(model, args)
    for opt in (opt_enc, opt_mask):
        set_learning_rates(opt, step=0, warmup=1, total=2)
    return model, opt_enc, opt_mask


def build_pair(args, device, num_classes):
    """Ours and the released side, from identical weights, so both do the same arithmetic per step."""
    ours = build_side(args, device, num_classes)
    plain = argparse.Namespace(**{**vars(args), "precision": "fp32", "channels_last": False, "compile": False})
    released = build_side(plain, device, num_classes)
    released[0].batch_slots = False     # one call per slot (SlotBatchNorm with 1 slot is plain BatchNorm)
    released[0].load_state_dict(ours[0].state_dict())
    return ours, released


# ---- timing --------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step, steps, device):
    """Milliseconds per call of step(), over `steps` calls, and the peak CUDA memory (MiB) meanwhile."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    ms = (time.perf_counter() - start) * 1000 / steps
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return ms, peak


def count_flops(step):
    """FLOPs of one call of step() (matmuls and convolutions, forward and backward), or None."""
    try:
        with FlopCounterMode(display=False) as counter:
            step()
        return counter.get_total_flops()
    except Exception as e:                                    # e.g. a compiled module the counter cannot follow
        print(f"FLOP count failed ({type(e).__name__}: {e}); reported as n/a")
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
