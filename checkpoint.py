"""Checkpoints of train.py, and the stops that keep them good.

A checkpoint is one plain dict, never half-written, checked before a run continues from it: `model`
(the whole ADIOS state), `encoder` (the backbone alone, loadable into torchvision), `optimizers`
(`encoder`, `masker`), `scaler`, `epoch` (completed epochs), `step`, `args` (every resolved flag). A stop
signal (SIGTERM, SIGINT) finishes the iteration and saves on every rank; a NaN or infinity stops the
run without saving, so the last checkpoint is the last good state. README: "Reading the outputs",
"When things go wrong".
"""
import os
import re
import signal
import sys

import torch
import torch.distributed as dist

from masker import Masker
from run_setup import distributed_world

# Two lists of train.py's flags (README "Stopping and resuming"). SHAPING flags fix what a run computes:
# resuming compares each with the checkpoint's `args` and refuses on any difference (the batch as the
# global batch). RUNNING flags only say how to run it and are free to change; `--epochs` is announced
# (the schedule stretches). DEVICE flags follow the machine: a change is allowed and announced.
SHAPING = ("dataset", "num_images", "data_version", "img_size", "jitter", "gpu_aug", "arch", "stem", "method",
           "proj_hidden_dim", "pred_hidden_dim", "proj_output_dim", "temperature", "simsiam_unmasked",
           "simsiam_masked_targets", "simsiam_both_masked", "no_gather", "num_masks", "single_mask", "alpha",
           "alpha_entropy", "mask_lr", "mask_channels", "mask_norm", "mask_blocks", "mask_type", "batch_size", "lr",
           "weight_decay", "optimizer", "warmup_epochs", "encoder_early_end", "classifier_lr", "sync_bn", "seed")
RUNNING = ("epochs", "max_steps", "save_every", "resume", "dry_run", "data_dir", "download", "workers", "device",
           "output_dir", "compile", "collective_timeout", "log_every", "tensorboard")
DEVICE = ("precision", "channels_last")


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


def load_scaler(scaler, saved):
    """Restore fp16's loss scale from a checkpoint's `scaler` state where both runs have one (a GradScaler is
    on with --precision fp16 only: fp32 and bf16 save an empty state). Returns a note to print, or None."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled():
        return "note: --precision fp16 now, and the checkpoint has no loss scale: it starts fresh"
    return None


def load_for_resume(path, args):
    """(checkpoint, None) if `path` holds a checkpoint this run can continue, else (None, one line why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                    # truncated, not a checkpoint, unreadable
        return None, f"cannot resume: {path} cannot be read ({type(e).__name__}); delete it or restore a copy"
    if not isinstance(ckpt, dict) or not {"model", "optimizers", "epoch", "step", "args"} <= ckpt.keys():
        return None, (f"cannot resume: {path} is not a checkpoint of train.py; move it away or choose "
                      "another --output_dir")
    if differences := shaping_differences(ckpt["args"], vars(args)):
        return None, (f"cannot resume: {path} was made with other flags that shape the run: "
                      f"{'; '.join(differences)}. Rerun with the checkpoint's values, or choose another --output_dir")
    return ckpt, None


def shaping_differences(made, now):
    """Each SHAPING flag whose value differs between the checkpoint's args `made` and this run's `now`, as
    '--flag OLD (this run: NEW)'. The batch is compared as the global batch; another process count at that
    batch is a difference too unless the run means the same (a key older checkpoints lack is not checked)."""
    show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)    # noqa: E731
    found = [f"--{k} {show(made[k])} (this run: {show(now[k])})" for k in SHAPING
             if k in made and k != "batch_size" and made[k] != now[k]]
    world = made.get("world_size", now["world_size"])
    if made["batch_size"] * world != now["batch_size"] * now["world_size"]:
        found.append(f"global batch {made['batch_size'] * world} = --batch_size {made['batch_size']} × {world} "
                     f"process(es) (this run: {now['batch_size'] * now['world_size']} = {now['batch_size']} × "
                     f"{now['world_size']})")
    elif world != now["world_size"] and (reason := not_the_same_on_other_counts(now)):
        found.append(f"{world} process(es) (this run: {now['world_size']}; another count at the same global "
                     f"batch is the same run only {reason})")
    return found


def not_the_same_on_other_counts(args):
    """Why K processes at a global batch G would not compute what K' processes at G do, or None. The
    images of each step are the same (data.py:ResumableSampler, seeded views); what else depends on K:"""
    if not args["sync_bn"]:
        return "with --sync_bn (BatchNorm over the global batch)"
    if args["no_gather"] and args["method"] == "simclr":
        return "without --no_gather (negatives from every process)"
    if args["gpu_aug"]:
        return "without --gpu_aug (its views are drawn per process)"
    if args["mask_type"] != "adios":
        return f"with learned masks (--mask_type {args['mask_type']} draws its masks per process)"
    if args["single_mask"] and args["num_masks"]:
        return "without --single_mask (ADIOS-s draws its slot per image per process)"
    return None


def find_checkpoint(args, device):
    """(the checkpoint in --output_dir this run continues from, or None; None, or one line why it cannot).

    Rank 0 alone reads and checks it and sends it to every rank, so only rank 0's --output_dir must hold it
    (on several machines the run folder need not be shared). --resume requires one."""
    rank, world = distributed_world()
    ckpt = problem = None
    if rank == 0:
        path = os.path.join(args.output_dir, "checkpoint.pth")
        if os.path.exists(path):
            ckpt, problem = load_for_resume(path, args)
        elif args.resume:
            problem = (f"--resume: there is no checkpoint at {path}; check --output_dir, or leave out --resume "
                       "to start a new run there")
        if ckpt is not None:
            print(f"resuming from {path}: epoch {ckpt['epoch']}, step {ckpt['step']}{changes(ckpt['args'], args)}")
    if world > 1:
        shared = [ckpt, problem]
        dist.broadcast_object_list(shared, src=0, device=device if device.type == "cuda" else None)
        ckpt, problem = shared
    return ckpt, problem


def changes(made, args):
    """What this run changes that a resume may change, said after the resume line (or '')."""
    said = []
    if made.get("epochs", args.epochs) != args.epochs:         # a longer or shorter run stretches the schedule
        said.append(f"it was made with --epochs {made['epochs']}, the schedule now spans {args.epochs}")
    for k in DEVICE:                                            # the numbers' format, not the run
        if made.get(k, getattr(args, k)) != getattr(args, k):
            said.append(f"--{k} {getattr(args, k)} on this machine (it was {made[k]})")
    return "".join(f"; {s}" for s in said)


def completed(ckpt, args):
    """One line saying the run in this checkpoint is already done (nothing left to train), or None."""
    if ckpt is None:
        return None
    if ckpt["epoch"] >= args.epochs:
        return (f"complete: epoch {ckpt['epoch']} of {args.epochs}, step {ckpt['step']}, in {args.output_dir}; "
                "nothing to train (a larger --epochs continues it, another --output_dir starts anew)")
    if args.max_steps is not None and ckpt["step"] >= args.max_steps:
        return (f"complete: step {ckpt['step']} of --max_steps {args.max_steps}, in {args.output_dir}; nothing "
                "to train (a larger --max_steps continues it)")
    return None


# ---- stopping: signals, non-finite numbers --------------------------------------------------------

def error_exit(message):
    """A failure during the run (not the user's input): one line on stderr, exit code 1."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def lost_peer(error):
    """'the process at HOST' (or 'a peer process') if `error` says a collective lost its peer, else None."""
    text = str(error)
    if not any(w in text for w in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted", "Socket Timeout", "Connection refused")):
        return None
    host = re.search(r"\[([^\]]+)\]:(\d+)", text)
    return f"the process at {host.group(1)} (port {host.group(2)})" if host else "a peer process"


def catch_stop_signals():
    """SIGTERM/SIGINT set stop["signal"]; the run then finishes its iteration, saves and exits 0."""
    stop = {"signal": None}
    stop["handlers"] = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum))
                        for s in (signal.SIGTERM, signal.SIGINT)}
    return stop


def release(stop):
    """Put the previous signal handlers back (if `stop` caught them) and leave the process group."""
    for s, handler in (stop or {"handlers": {}})["handlers"].items():
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


# ---- what other programs read from a checkpoint -------------------------------------------------

def learned_masker(ckpt):
    """The checkpoint's Masker M_φ (frozen, eval mode), or None without learned masks (N = 0, baselines)."""
    args = ckpt["args"]
    weights = {k[len("masker."):]: v for k, v in ckpt.get("model", {}).items() if k.startswith("masker.")}
    if args.get("num_masks", 0) < 2 or args.get("mask_type", "adios") != "adios" or not weights:
        return None
    masker = Masker(args["num_masks"], args["img_size"], args["mask_channels"], args["mask_norm"],
                    args.get("mask_blocks"))                  # None (older checkpoints): the size's default
    masker.load_state_dict(weights)
    return masker.eval().requires_grad_(False)
