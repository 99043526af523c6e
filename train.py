"""Train ADIOS: the inference model and the occlusion model take alternating steps (Sec. 2).

    python train.py                                                    # CPU: ADIOS on the embedded shapes data
    python train.py --dataset stl10 --download                         # one GPU: the released STL10 SimCLR run
    torchrun --nproc_per_node=4 train.py --dataset stl10               # four GPUs: 64 each, the global batch 256

--dataset, --method and --arch (and --img_size for ImageNet100) choose one of the released runs, whose
every setting the recipe tables (recipes.py) fill in; a flag you give wins. The recipe's batch is the global
batch, divided among the processes; a --batch_size you give is per process. The run lives in --output_dir
(default runs/<dataset>_<method>_<arch>..., plus the flags that set it apart from the recipe) and continues
from its checkpoint.pth whenever there is one, if every flag that shapes the run (checkpoint.py:SHAPING) is
the same; rerun the same command after a crash or a stop (SIGTERM saves and exits 0: nothing restarts it by
itself, not even torchrun --max_restarts). Read in this order: adios_step, train_one_epoch, main,
end_of_epoch. README: "Quickstart", "Recipes", "Reading the outputs", "Stopping and resuming".
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import batchnorm
from checkpoint import (catch_stop_signals, checkpoint_state, completed, error_exit, find_checkpoint,
                        first_non_finite_weight, load_scaler, lost_peer, must_stop, release, save_checkpoint,
                        stop_agreed)
from cli_checks import output_dir_problem
from losses import byol_tau
from monitor import Averager, Curves, print_config, record_epoch
from optim import build_optimizers, learning_rate_schedules, set_learning_rates
from recipes import fail, parse_args
from run_setup import autocast_for, build_data, build_model, distributed_world, setup_distributed


# ---- the algorithm ------------------------------------------------------------------------------

def adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, amp):
    """One ADIOS iteration on one batch (Sec. 2): the encoder step, then the masker step.

    Returns the two objectives' stats dicts (the masker's is empty without a masker step).
    """
    # Encoder step: f_θ minimises Σ_n L_ssl with the masks fixed (Sec. 2), plus the online probe.
    with amp(), batchnorm.as_released(model, "encoder"):     # running statistics as the released loop's
        loss, enc = model.encoder_loss(x_a, x_b, labels)
    opt_enc.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()          # fp16: scale the loss so small gradients do not underflow
    scaler.step(opt_enc)                   # unscales first; skips the step if a gradient overflowed
    # Masker step: M_φ minimises −Σ_n L_ssl + α·P through the just-updated, frozen f_θ (Sec. 2).
    msk = {}
    if opt_mask is not None:
        with amp(), batchnorm.as_released(model, "masker"):
            loss, msk = model.masker_loss(x_a, x_b)
        opt_mask.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt_mask)
    scaler.update()                        # once per iteration, after both players' steps
    return enc, msk


def train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, epoch, step, schedules, args, device, stop,
                    curves=None):
    """One pass over this rank's share of the data (what is left of it after a mid-epoch resume).
    Returns (the epoch's mean stats and learning rates, the global step reached).

    The stats stay on the device (monitor.Averager); the host reads them, checks them for NaN and
    infinity and agrees with the other ranks whether to stop only every --log_every steps (check_every)
    and at the epoch's end, so the CPU can queue the next steps' kernels meanwhile. One process stops on
    a signal after the current step (no agreement needed); several after the next check. curves: --tensorboard's
    monitor.Curves (rank 0), written at every check, or None."""
    model.train()
    rank, world = distributed_world()
    avg = Averager()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format     # the model's (run_setup)
    checked, means = step, {}
    # A with-block: on an exception (a lost peer) the bar clears its line before the one-line message.
    with tqdm(total=len(loader), desc=f"epoch {epoch}", disable=rank != 0, leave=False) as bar:
        for (x_a, x_b), labels in loader:
            if step >= schedules["last_step"]:
                break
            set_learning_rates(opt_enc, step, **schedules["encoder"])
            if opt_mask is not None:
                set_learning_rates(opt_mask, step, **schedules["masker"])
            x_a, x_b = (x.to(device, non_blocking=True, memory_format=layout) for x in (x_a, x_b))
            labels = labels.to(device, non_blocking=True)

            torch.manual_seed(step_seed(args.seed, step, rank))   # ADIOS-s slots, random/block masks
            enc, msk = adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, amp)
            if model.method == "byol":
                model.momentum_update(byol_tau(step, schedules["masker"]["total"]))
            step += 1

            avg.add({**{f"enc_{k}": v for k, v in enc.items()}, **{f"mask_{k}": v for k, v in msk.items()}}, step)
            bar.update()
            if step % check_every(args, device) == 0 or (world == 1 and stop["signal"] is not None):
                checked = step
                means, stopping = check(avg, bar, stop, step, epoch, device, curves, rates(opt_enc, opt_mask))
                if stopping:                     # a signal, here or on another rank
                    break
        if checked != step:                      # the epoch's end or --max_steps: checked before any save
            means, _ = check(avg, bar, stop, step, epoch, device, curves, rates(opt_enc, opt_mask))
    return {**means, **rates(opt_enc, opt_mask)}, step


def rates(opt_enc, opt_mask):
    """The two players' current learning rates, for the log."""
    return dict(lr=opt_enc.param_groups[0]["lr"], mask_lr=opt_mask.param_groups[0]["lr"] if opt_mask else 0.0)


def check_every(args, device):
    """--log_every, or its default: 20 steps on CUDA; every step on the CPU, where reading costs no wait."""
    return args.log_every or (20 if device.type == "cuda" else 1)


def check(avg, bar, stop, step, epoch, device, curves=None, lrs=None):
    """The host reads the stats (one copy), shows the loss and draws the curves; exits on a non-finite one
    (nothing saved). Returns (the epoch's means so far, whether to stop: checkpoint.must_stop)."""
    means, first_bad = avg.read()
    bar.set_postfix(loss=f"{means.get('enc_ssl_loss', float('nan')):.3f}", refresh=False)
    stopping = must_stop(first_bad, stop, step, epoch, device)
    if curves is not None:
        curves.check(means, avg.count, step, epoch, lrs)
    return means, stopping


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv, __doc__)         # recipes filled in; bad input answered in one line
    rank, world, device = setup_distributed(args.device, args.collective_timeout)
    is_main, args.world_size = rank == 0, world
    amp = autocast_for(args, device)
    if is_main:
        print_config(args, device)
    if args.dry_run:
        return vars(args)
    if problem := output_dir_problem(args.output_dir):
        fail(problem)
    try:
        return run_training(args, rank, world, device, amp)
    except RuntimeError as e:                # a collective failed: another process or machine has ended
        if world == 1 or not (peer := lost_peer(e)):
            raise
        error_exit(f"rank {rank} lost {peer}: another process of this run ended (its own message, or torchrun's "
                   f"report, says why). The last checkpoint in {args.output_dir} (if any) is intact: rerun the same "
                   "command on every machine to resume")


def run_training(args, rank, world, device, amp):
    """Resume or start, build the data, the models and the optimisers, and train to the end (or a stop)."""
    is_main = rank == 0
    resume, problem = find_checkpoint(args, device)
    if problem:                             # rank 0 alone checked the checkpoint: it says why, all stop
        if is_main:
            fail(problem)
        sys.exit(2)
    if done := completed(resume, args):
        if is_main:
            print(done)
        release(None)
        return dict(epoch=resume["epoch"] - 1, step=resume["step"], complete=True)

    # ---- data ----
    loader, val_set, num_classes = build_data(args, device, world, is_main)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=min(args.workers, 2),
                                             persistent_workers=args.workers > 0)
    fixed = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))]).to(device)   # for the picture

    # ---- models ----
    torch.manual_seed(args.seed)            # --seed fixes the initial weights too (DDP then copies rank 0's)
    model = build_model(args, num_classes, world, device)

    # ---- optimisers ----
    opt_enc, opt_mask = build_optimizers(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    # ---- resume ----
    start_epoch, step = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt_enc.load_state_dict(resume["optimizers"]["encoder"])
        if opt_mask is not None:
            opt_mask.load_state_dict(resume["optimizers"]["masker"])
        if (note := load_scaler(scaler, resume["scaler"])) and is_main:     # fp16's loss scale, where both have one
            print(note)
        start_epoch, step = resume["epoch"], resume["step"]

    # ---- train ----
    steps_per_epoch = len(loader)
    schedules = learning_rate_schedules(args, steps_per_epoch)
    stop = catch_stop_signals()
    curves = Curves(args.output_dir, step) if args.tensorboard and is_main else None    # TensorBoard, optional
    log = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            if step >= schedules["last_step"]:
                break
            # This epoch's order and views; resuming mid-epoch, skip (unloaded) the images already trained on.
            loader.sampler.set_epoch(epoch, start=(step - epoch * steps_per_epoch) * args.batch_size)
            start_step, start_time = step, time.time()
            stats, step = train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, epoch, step, schedules,
                                          args, device, stop, curves)
            log = dict(epoch=epoch, step=step, **stats,
                       images_per_s=(step - start_step) * args.batch_size * world / (time.time() - start_time))
            if end_of_epoch(model, opt_enc, opt_mask, scaler, amp, log, args, schedules, val_loader, fixed, stop,
                            device, curves):
                break
    finally:
        release(stop)
        if curves is not None:
            curves.close()
    return log


def end_of_epoch(model, opt_enc, opt_mask, scaler, amp, log, args, schedules, val_loader, fixed, stop, device,
                 curves=None):
    """Check the weights; on rank 0 save first, then evaluate, log and draw the masks (a stop signal skips the
    evaluation and the picture: the log line says so). True if the run must stop."""
    epoch, step = log["epoch"], log["step"]
    if (bad := first_non_finite_weight(model)) is not None:  # the same weights on every rank: all stop
        error_exit(f"non-finite weights in {bad} after step {step} (epoch {epoch}); stopped without saving, "
                   "the last checkpoint is intact. Lower --lr or --mask_lr, or use --precision fp32")
    finished = step == (epoch + 1) * schedules["steps_per_epoch"]      # else a stop: resume into this epoch
    if distributed_world()[0] == 0:
        state = checkpoint_state(model, opt_enc, opt_mask, scaler, epoch + 1 if finished else epoch, step, args)
        save_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
        if args.save_every and finished and (epoch + 1) % args.save_every == 0:
            save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint_epoch{epoch + 1:03d}.pth"))
        record_epoch(model, log, args, schedules, val_loader, fixed, device, amp, evaluate=stop["signal"] is None,
                     curves=curves)
    return stop_agreed(stop, step, device)      # after rank 0's save, so a signal during it stops all ranks


# ---- small helpers -------------------------------------------------------------------------------

def step_seed(seed, step, rank):
    """The torch seed of one iteration on one rank. Its random choices then depend on nothing else (not on
    evaluation between epochs, nor on where a run was resumed), like the views (data.SeededViews)."""
    return ((seed * 1_000_003 + rank) * 100_000_007 + step) % 2 ** 64    # torch takes seeds below 2^64


if __name__ == "__main__":
    main()
