"""Checkpoints of train.py, and the stops that keep them good.

A checkpoint is one plain dict, never half-written, checked before a run continues from it: `model`
(the whole ADIOS state), `encoder` (the backbone alone, loadable into torchvision), `optimizers`
(`encoder`, `masker`), `scaler`, `epoch` (completed epochs), `step`, `args` (every resolved flag). A stop
signal (SIGTERM, SIGINT) finishes the iteration and saves on every rank; a NaN or infinity stops the
run without saving, so the last checkpoint is the last good state. README: "Reading the outputs",
"When things go wrong".
"""
import os
import signal
import sys

import torch
import torch.distributed as dist

from adios import distributed_world

# What a resumed run must share with the checkpoint: the model's shape, and what fixes which images a
# step trains on (the step ↔ (epoch, image) mapping that an exact mid-epoch resume relies on).
MUST_MATCH = ("arch", "num_masks", "img_size", "method", "mask_type", "mask_channels", "mask_norm", "mask_blocks",
              "stem", "dataset", "num_images", "batch_size")


def checkpoint_state(model, opt_enc, opt_mask, scaler, epoch, step, args):
    return dict(model=model.state_dict(), encoder=model.encoder.state_dict(),
                optimizers=dict(encoder=opt_enc.state_dict(), masker=opt_mask.state_dict() if opt_mask else None),
                scaler=scaler.state_dict(), epoch=epoch, step=step, args=vars(args))


def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash or full disk mid-save leaves the old file intact.
    A failed write stops the run (exit 1): training on without checkpoints would risk more than it gains."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())           # on disk before the rename: a power cut cannot leave an empty file
        os.replace(tmp, path)              # atomic: readers see the old checkpoint or the new, never half
    except OSError as e:
        error_exit(f"cannot write {path} ({e.strerror or e}); the previous checkpoint is intact: free some "
                   "space and rerun the same command")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_for_resume(path, args):
    """(checkpoint, None) if `path` holds a checkpoint this run can continue, else (None, one line why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                    # truncated, not a checkpoint, unreadable
        return None, f"cannot resume: {path} cannot be read ({type(e).__name__}); delete it or restore a copy"
    if not isinstance(ckpt, dict) or not {"model", "optimizers", "epoch", "step", "args"} <= ckpt.keys():
        return None, (f"cannot resume: {path} is not a checkpoint of train.py; move it away or choose "
                      "another --output_dir")
    for key in MUST_MATCH:                                    # (a key older checkpoints lack is not checked)
        if key in ckpt["args"] and ckpt["args"][key] != getattr(args, key):
            return None, (f"cannot resume: {path} was made with --{key} {ckpt['args'].get(key)}, this run has "
                          f"{getattr(args, key)}; use the same value or another --output_dir")
    if ckpt["args"].get("world_size", args.world_size) != args.world_size:     # the global batch, likewise
        return None, (f"cannot resume: {path} was made by {ckpt['args']['world_size']} processes, this run has "
                      f"{args.world_size}; use the same torchrun --nproc_per_node or another --output_dir")
    return ckpt, None


def find_checkpoint(args, device, announce=True):
    """(the checkpoint in --output_dir this run continues from, or None; None, or one line why it cannot).
    Every rank reads it, so every rank must see it (on several machines: a shared --output_dir)."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    found, missing = agree([os.path.exists(path), not os.path.exists(path)], device)
    if found and missing:
        return None, (f"--output_dir {args.output_dir}: some processes see {path} and others do not; put "
                      "--output_dir on a filesystem every machine shares")
    if not os.path.exists(path):
        if args.resume and announce:
            print(f"--resume: no checkpoint at {path} yet, starting from scratch")
        return None, None
    ckpt, problem = load_for_resume(path, args)
    if ckpt is not None and announce:
        made = ckpt["args"].get("epochs", args.epochs)     # a longer or shorter run stretches the schedule
        other = f"; it was made with --epochs {made}, the schedule now spans {args.epochs}" if made != args.epochs else ""
        print(f"resuming from {path}: epoch {ckpt['epoch']}, step {ckpt['step']}{other}")
    return ckpt, problem


# ---- stopping: signals, non-finite numbers --------------------------------------------------------

def error_exit(message):
    """A failure during the run (not the user's input): one line on stderr, exit code 1."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def catch_stop_signals():
    """SIGTERM/SIGINT set stop["signal"]; the run then finishes its iteration, saves and exits 0."""
    stop = {"signal": None}
    stop["handlers"] = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum))
                        for s in (signal.SIGTERM, signal.SIGINT)}
    return stop


def release(stop):
    """Put the previous signal handlers back and leave the process group."""
    for s, handler in stop["handlers"].items():
        signal.signal(s, handler)
    if dist.is_initialized():
        dist.destroy_process_group()


def must_stop(first_bad, stop, step, epoch, device):
    """At a check (every --log_every steps and at an epoch's end: train.py:train_one_epoch): exit 1 if
    any rank's loss turned NaN or infinite since the last one (nothing saved); True if a stop signal
    reached any rank (every rank then stops after this same iteration). first_bad: {stat: the first step
    it was non-finite}, from monitor.Averager.read. With several processes: one all-reduce."""
    bad = first_non_finite(first_bad)
    any_bad, any_stop = agree([bad is not None, stop["signal"] is not None], device)
    if any_bad:
        where = f"{bad[0]} at step {bad[1]}" if bad else f"loss on another rank by step {step}"
        error_exit(f"non-finite {where} (epoch {epoch}); stopped without saving, the last checkpoint is "
                   "intact. Lower --lr or --mask_lr, raise --alpha, or use --precision fp32")
    if any_stop:
        stop["signal"] = stop["signal"] or "on another rank"
    return any_stop


def stop_agreed(stop, step, device):
    """At an epoch's end: True on every rank if a stop signal reached any of them (said once, by rank 0)."""
    if not agree([stop["signal"] is not None], device)[0]:
        return False
    stop["signal"] = stop["signal"] or "on another rank"
    if distributed_world()[0] == 0:
        print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, rerun the same command to continue")
    return True


# The loss terms checked for NaN and infinity, in the order an iteration computes them: (stat, name).
LOSS_TERMS = (("enc_ssl_loss", "encoder loss"), ("enc_online_ce", "online probe loss"),
              ("mask_ssl_loss", "masker loss"), ("mask_penalty", "sparsity penalty"))


def first_non_finite(first_bad):
    """(name, step) of the loss term that turned NaN or infinite first, from {stat: first bad step}, or None."""
    found = [(first_bad[stat], i, name) for i, (stat, name) in enumerate(LOSS_TERMS) if stat in first_bad]
    return (min(found)[2], min(found)[0]) if found else None


def first_non_finite_weight(model):
    """Name of the first parameter holding a NaN or infinity, or None: a non-finite gradient can spoil
    the weights while the loss that produced it was finite, so this is checked before every save."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def agree(flags, device):
    """Each flag True on every rank if it is True on any (a non-finite loss, a stop request)."""
    if distributed_world()[1] == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
