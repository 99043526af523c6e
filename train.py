"""Train ADIOS: the inference model and the occlusion model take alternating steps (Sec. 2).

    python train.py                                                    # CPU: ADIOS on the embedded shapes data
    python train.py --dataset stl10 --download                         # one GPU: the released STL10 SimCLR run
    torchrun --nproc_per_node=4 train.py --dataset stl10               # four GPUs: 64 each, the global batch 256

--dataset, --method and --arch (and --img_size for ImageNet100) choose one of the released runs, whose
every setting the recipe tables below fill in; a flag you give wins. The recipe's batch is the global batch,
divided among the processes; a --batch_size you give is per process. The run lives in --output_dir
(default runs/<dataset>_<method>_<arch>..., plus the flags that set it apart from the recipe) and continues
from its checkpoint.pth whenever there is one, if every flag that shapes the run (checkpoint.py:SHAPING) is
the same; rerun the same command after a crash or a stop (SIGTERM saves and exits 0: nothing restarts it by
itself, not even torchrun --max_restarts). Read in this order: adios_step, train_one_epoch, main,
end_of_epoch; then the recipes and arguments, and what builds the run. README: "Quickstart", "Recipes",
"Reading the outputs", "Stopping and resuming".
"""
import argparse
import hashlib
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import cli_checks
import data
import shapes
from adios import METHODS, byol_tau, distributed_world
from checkpoint import (SHAPING, catch_stop_signals, checkpoint_state, completed, error_exit, find_checkpoint,
                        first_non_finite_weight, lost_peer, must_stop, release, save_checkpoint, stop_agreed)
from cli_checks import Parser, output_dir_problem, train_args_problem
from encoders import ARCHS, STEMS
from masker import NORMS
from monitor import Averager, print_config, record_epoch
from optim import build_optimizers, learning_rate_schedules, set_learning_rates
from run_setup import autocast_for, build_data, build_model, setup_distributed


# ---- the algorithm ------------------------------------------------------------------------------

def adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, amp):
    """One ADIOS iteration on one batch (Sec. 2): the encoder step, then the masker step.

    Returns the two objectives' stats dicts (the masker's is empty without a masker step).
    """
    # Encoder step: f_θ minimises Σ_n L_ssl with the masks fixed (Sec. 2), plus the online probe.
    with amp():
        loss, enc = model.encoder_loss(x_a, x_b, labels)
    opt_enc.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()          # fp16: scale the loss so small gradients do not underflow
    scaler.step(opt_enc)                   # unscales first; skips the step if a gradient overflowed
    # Masker step: M_φ minimises −Σ_n L_ssl + α·P through the just-updated, frozen f_θ (Sec. 2).
    msk = {}
    if opt_mask is not None:
        with amp():
            loss, msk = model.masker_loss(x_a, x_b)
        opt_mask.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt_mask)
    scaler.update()                        # once per iteration, after both players' steps
    return enc, msk


def train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, epoch, step, schedules, args, device, stop):
    """One pass over this rank's share of the data (what is left of it after a mid-epoch resume).
    Returns (the epoch's mean stats and learning rates, the global step reached).

    The stats stay on the device (monitor.Averager); the host reads them, checks them for NaN and
    infinity and agrees with the other ranks whether to stop only every --log_every steps (check_every)
    and at the epoch's end, so the CPU can queue the next steps' kernels meanwhile. One process stops on
    a signal after the current step (no agreement needed); several after the next check."""
    model.train()
    rank, world = distributed_world()
    avg = Averager()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=rank != 0, leave=False)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format     # the model's (run_setup)
    checked, means = step, {}
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
            means, stopping = check(avg, bar, stop, step, epoch, device)
            if stopping:                     # a signal, here or on another rank
                break
    if checked != step:                      # the epoch's end or --max_steps: checked before any save
        means, _ = check(avg, bar, stop, step, epoch, device)
    bar.close()
    lrs = dict(lr=opt_enc.param_groups[0]["lr"], mask_lr=opt_mask.param_groups[0]["lr"] if opt_mask else 0.0)
    return {**means, **lrs}, step


def check_every(args, device):
    """--log_every, or its default: 20 steps on CUDA; every step on the CPU, where reading costs no wait."""
    return args.log_every or (20 if device.type == "cuda" else 1)


def check(avg, bar, stop, step, epoch, device):
    """The host reads the stats (one copy) and shows the loss; exits on a non-finite one (nothing
    saved). Returns (the epoch's means so far, whether to stop: checkpoint.must_stop)."""
    means, first_bad = avg.read()
    bar.set_postfix(loss=f"{means.get('enc_ssl_loss', float('nan')):.3f}", refresh=False)
    return means, must_stop(first_bad, stop, step, epoch, device)


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)                  # recipes filled in; bad input answered in one line
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
        scaler.load_state_dict(resume["scaler"])
        start_epoch, step = resume["epoch"], resume["step"]

    # ---- train ----
    steps_per_epoch = len(loader)
    schedules = learning_rate_schedules(args, steps_per_epoch)
    stop = catch_stop_signals()
    log = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            if step >= schedules["last_step"]:
                break
            # This epoch's order and views; resuming mid-epoch, skip (unloaded) the images already trained on.
            loader.sampler.set_epoch(epoch, start=(step - epoch * steps_per_epoch) * args.batch_size)
            start_step, start_time = step, time.time()
            stats, step = train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, epoch, step, schedules,
                                          args, device, stop)
            log = dict(epoch=epoch, step=step, **stats,
                       images_per_s=(step - start_step) * args.batch_size * world / (time.time() - start_time))
            if end_of_epoch(model, opt_enc, opt_mask, scaler, amp, log, args, schedules, val_loader, fixed, stop,
                            device):
                break
    finally:
        release(stop)
    return log


def end_of_epoch(model, opt_enc, opt_mask, scaler, amp, log, args, schedules, val_loader, fixed, stop, device):
    """Check the weights; on rank 0 evaluate, log, draw the masks and save. True if the run must stop."""
    epoch, step = log["epoch"], log["step"]
    if (bad := first_non_finite_weight(model)) is not None:  # the same weights on every rank: all stop
        error_exit(f"non-finite weights in {bad} after step {step} (epoch {epoch}); stopped without saving, "
                   "the last checkpoint is intact. Lower --lr or --mask_lr, or use --precision fp32")
    finished = step == (epoch + 1) * schedules["steps_per_epoch"]      # else a stop: resume into this epoch
    if distributed_world()[0] == 0:
        record_epoch(model, log, args, schedules, val_loader, fixed, device, amp)
        state = checkpoint_state(model, opt_enc, opt_mask, scaler, epoch + 1 if finished else epoch, step, args)
        save_checkpoint(state, os.path.join(args.output_dir, "checkpoint.pth"))
        if args.save_every and finished and (epoch + 1) % args.save_every == 0:
            save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint_epoch{epoch + 1:03d}.pth"))
    return stop_agreed(stop, step, device)      # after rank 0's save, so a signal during it stops all ranks


# ---- recipes: the released runs ------------------------------------------------------------------
# The authors released one training script per run (one GPU each, so the batch is the global batch;
# README "Recipes"): their values, to full precision, in three tables; a flag given on the command line
# wins. ImageNet100 at 96 px is ImageNet100-S; at 224 px every run is ADIOS-s (recipe_for).
RATE_COLUMNS = ("epochs", "batch_size", "lr", "mask_lr", "weight_decay")
RECIPE_RATES = {  #                              ep   B    lr                   mask_lr               weight decay
    ("stl10", "simclr", "resnet18"):            (400, 256, 0.13234838295784523, 0.01946841419435407,  8.504658547335148e-05),
    ("stl10", "byol", "resnet18"):              (400, 128, 0.2920279558260822,  0.09281403683825379,  9.912019840903654e-06),
    ("stl10", "simsiam", "resnet18"):           (400, 128, 0.4436168048573669,  0.038296424016559166, 7.227625739330174e-06),
    ("stl10", "simclr", "vit_tiny"):            (200, 128, 0.102523479861102,   0.0941063568112331,   0.0001),
    ("stl10", "byol", "vit_tiny"):              (200, 64,  0.44397171059658247, 0.20463999909125877,  1e-05),
    ("stl10", "simsiam", "vit_tiny"):           (200, 128, 0.2917762337709393,  0.0931682474492948,   1e-05),
    ("imagenet100-96", "simclr", "resnet18"):   (500, 128, 0.11127702230184772, 0.014515024186652984, 0.0001),
    ("imagenet100-96", "byol", "resnet18"):     (500, 128, 0.24140186236916927, 0.06599301363636853,  1e-05),
    ("imagenet100-96", "simsiam", "resnet18"):  (500, 128, 0.8470842123448166,  0.08023435854528733,  1e-05),
    ("imagenet100-96", "simclr", "vit_tiny"):   (300, 128, 0.11572042971808227, 0.03340125573939769,  0.0001),
    ("imagenet100-96", "byol", "vit_tiny"):     (300, 128, 0.21411127909038455, 0.32636188418935613,  1e-05),
    ("imagenet100-96", "simsiam", "vit_tiny"):  (300, 128, 0.4968768680935606,  0.0665602736669426,   1e-05),
    ("imagenet100-224", "simclr", "resnet18"):  (400, 128, 0.18955780763100336, 0.4987622134866454,   0.0001),
    ("imagenet100-224", "byol", "resnet18"):    (400, 128, 0.8087906078374081,  0.12952098519347935,  1e-05),
    ("imagenet100-224", "simsiam", "resnet18"): (400, 128, 0.5424648008289498,  0.4846424666121607,   1e-05),
}
# The masker's objective (α: the sparsity penalty, α₂: the slot-area entropy) and its U-Net.
MASKER_COLUMNS = ("alpha", "alpha_entropy", "num_masks", "mask_channels", "mask_norm", "mask_blocks")
RECIPE_MASKERS = {  #                            α                    α₂                  N  c    norm  K
    ("stl10", "simclr", "resnet18"):            (0.0,                 0.0,                6, 128, "gn", 5),
    ("stl10", "byol", "resnet18"):              (1.7193143216139353,  0.0,                6, 64,  "gn", 5),
    ("stl10", "simsiam", "resnet18"):           (1.0,                 0.0,                6, 32,  "gn", 5),
    ("stl10", "simclr", "vit_tiny"):            (0.39131043617986705, 0.0,                4, 32,  "gn", 5),
    ("stl10", "byol", "vit_tiny"):              (0.8269158678071891,  0.0,                6, 32,  "gn", 5),
    ("stl10", "simsiam", "vit_tiny"):           (0.8581936366173779,  0.0,                6, 16,  "gn", 4),
    ("imagenet100-96", "simclr", "resnet18"):   (0.9229467944410698,  0.711773255433044,  4, 32,  "in", 5),
    ("imagenet100-96", "byol", "resnet18"):     (0.40384562663515944, 0.0,                6, 16,  "gn", 5),
    ("imagenet100-96", "simsiam", "resnet18"):  (0.200319625755856,   0.2857646914017864, 4, 16,  "gn", 4),
    ("imagenet100-96", "simclr", "vit_tiny"):   (0.8890717462273039,  0.0,                6, 16,  "gn", 5),
    ("imagenet100-96", "byol", "vit_tiny"):     (0.9517975576926448,  0.0,                6, 8,   "gn", 5),
    ("imagenet100-96", "simsiam", "vit_tiny"):  (0.7217629549008437,  0.0,                4, 16,  "gn", 4),
    ("imagenet100-224", "simclr", "resnet18"):  (0.75,                0.0,                4, 8,   "gn", 6),
    ("imagenet100-224", "byol", "resnet18"):    (1.0,                 0.0,                6, 32,  "gn", 6),
    ("imagenet100-224", "simsiam", "resnet18"): (0.5,                 0.0,                4, 32,  "gn", 4),
}
# Heads, views and the encoder's schedule. jitter: brightness, contrast, saturation, hue (J: the released
# default). SimSiam terms added to the always-on masked p vs clean z, each a --simsiam_* flag: the unmasked
# pair, clean p vs masked z (masked targets), masked p vs masked z (both masked). early:
# --encoder_early_end, the epochs by which the encoder's warmup-cosine ends before the masker's (the
# released BYOL runs: 10).
J, STL10_SIMSIAM_JITTER = (0.8, 0.8, 0.8, 0.2), (0.5521874334305088, 0.4775521429505951, 0.5784474905390056, 0.2)
UNMASKED, MASKED_TARGETS, BOTH_MASKED = ("simsiam_unmasked",), ("simsiam_masked_targets",), ("simsiam_both_masked",)
MODEL_COLUMNS = ("proj_output_dim", "proj_hidden_dim", "pred_hidden_dim", "jitter", "simsiam_terms", "encoder_early_end")
RECIPE_MODELS = {  #                             out   proj  pred  jitter                  SimSiam terms                             early
    ("stl10", "simclr", "resnet18"):            (256,  2048, None, J,                      (),                                       0),
    ("stl10", "byol", "resnet18"):              (256,  4096, 8192, J,                      (),                                       10),
    ("stl10", "simsiam", "resnet18"):           (256,  2048, 512,  STL10_SIMSIAM_JITTER,   UNMASKED,                                 0),
    ("stl10", "simclr", "vit_tiny"):            (128,  2048, None, J,                      (),                                       0),
    ("stl10", "byol", "vit_tiny"):              (256,  4096, 8192, J,                      (),                                       10),
    ("stl10", "simsiam", "vit_tiny"):           (2048, 2048, 512,  (0.4, 0.4, 0.4, 0.1),   MASKED_TARGETS,                           0),
    ("imagenet100-96", "simclr", "resnet18"):   (128,  2048, None, J,                      (),                                       0),
    ("imagenet100-96", "byol", "resnet18"):     (256,  4096, 8192, (0.4, 0.4, 0.2, 0.1),   (),                                       10),
    ("imagenet100-96", "simsiam", "resnet18"):  (2048, 2048, 512,  (0.4, 0.4, 0.4, 0.1),   UNMASKED + BOTH_MASKED,                   0),
    ("imagenet100-96", "simclr", "vit_tiny"):   (128,  2048, None, J,                      (),                                       0),
    ("imagenet100-96", "byol", "vit_tiny"):     (256,  4096, 8192, (0.4, 0.4, 0.2, 0.1),   (),                                       10),
    ("imagenet100-96", "simsiam", "vit_tiny"):  (2048, 2048, 512,  (0.4, 0.4, 0.4, 0.1),   BOTH_MASKED,                              0),
    ("imagenet100-224", "simclr", "resnet18"):  (128,  2048, None, (0.7, 0.6, 0.8, 0.15),  (),                                       0),
    ("imagenet100-224", "byol", "resnet18"):    (256,  4096, 8192, (0.5, 0.2, 0.25, 0.05), (),                                       10),
    ("imagenet100-224", "simsiam", "resnet18"): (2048, 2048, 512,  (0.4, 0.4, 0.4, 0.1),   UNMASKED + MASKED_TARGETS + BOTH_MASKED,  0),
}
# Every released run: SGD in LARS, 10 warmup epochs.
RECIPE_COMMON = dict(optimizer="lars", warmup_epochs=10)
# Without a recipe (the CPU demo on shapes, or any other combination).
DEFAULTS = dict(epochs=6, batch_size=64, lr=0.3, mask_lr=0.05, weight_decay=1e-5, alpha=1.0, alpha_entropy=0.0,
                num_masks=4, mask_channels=16, mask_norm="gn", mask_blocks=None, single_mask=False, proj_hidden_dim=512,
                pred_hidden_dim=None, proj_output_dim=128, simsiam_unmasked=False, simsiam_masked_targets=False,
                simsiam_both_masked=False, jitter=None, optimizer="lars", warmup_epochs=1, encoder_early_end=0,
                img_size=None, stem=None)
# The CPU demo (shapes, no recipe) trains in ≤ 10 minutes on 2 cores: two masks buy the epochs its probe
# needs to rise (README, "Evidence on shapes"); anything given on the command line wins.
SHAPES_DEFAULTS = dict(epochs=10, num_masks=2)


def recipe_for(dataset, method, arch, img_size):
    """The released run matching this choice as {flag: value}, or {} (ImageNet100 is keyed by its size)."""
    key = (f"imagenet100-{img_size or 224}" if dataset == "imagenet100" else dataset, method, arch)
    if key not in RECIPE_RATES:
        return {}
    recipe = {**RECIPE_COMMON, **dict(zip(RATE_COLUMNS, RECIPE_RATES[key])),
              **dict(zip(MASKER_COLUMNS, RECIPE_MASKERS[key])), **dict(zip(MODEL_COLUMNS, RECIPE_MODELS[key]))}
    terms = recipe.pop("simsiam_terms")
    recipe.update({flag: flag in terms for flag in UNMASKED + MASKED_TARGETS + BOTH_MASKED})
    recipe.update(jitter=list(recipe["jitter"]), single_mask=key[0] == "imagenet100-224")
    return recipe


# ---- arguments -----------------------------------------------------------------------------------

def settings_for(dataset, method, arch, img_size):
    """({flag: value} for every flag not given, whether a released run matched): the matching released run's
    values, else the CPU demo's (shapes), else DEFAULTS."""
    recipe = recipe_for(dataset, method, arch, img_size)
    demo = SHAPES_DEFAULTS if dataset == "shapes" and not recipe else {}
    return {**DEFAULTS, **demo, **recipe}, bool(recipe)


def get_args_parser():
    p = Parser("train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS    # recipe-controlled flags: absent from args unless given (see resolve_args)
    on_off = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", help="shapes (embedded, no download), stl10, cifar10, "
                   "cifar100, imagenet100 (a folder; 224 px, or 96 px = ImageNet100-S), imagefolder")
    g.add_argument("--data_dir", default="./data", help="where datasets live / are downloaded to")
    g.add_argument("--download", action="store_true", help="download STL10/CIFAR if absent (rank 0)")
    g.add_argument("--img_size", type=int, default=S, help="image size (default: the dataset's)")
    g.add_argument("--num_images", type=int, default=None, help="shapes: images generated (4096); "
                   "others: use only the first K images (smoke runs)")
    g.add_argument("--workers", type=int, default=None, help="data-loading processes per GPU/process (default: "
                   "the machine's cores shared among its processes, e.g. 16 for one GPU on a 16-core host)")
    g.add_argument("--jitter", type=float, nargs=4, default=S, metavar=("B", "C", "S", "H"),
                   help="colour jitter strengths (default: the recipe's, else 0.8 0.8 0.8 0.2; shapes 0.4 0.4 0.4 0.1)")
    g.add_argument("--gpu_aug", action="store_true", help="keep the uint8 dataset on the device and augment "
                   "there (shapes, stl10, cifar: STL10 takes 2.9 GB); no CPU workers")
    g = p.add_argument_group("model: the inference model f_θ")
    g.add_argument("--arch", default="resnet18", choices=ARCHS)
    g.add_argument("--stem", default=S, choices=STEMS, help="ResNet stem: auto = ImageNet stem from 64 px, "
                   "3×3 CIFAR stem below; shapes defaults to standard (15× cheaper at 32 px)")
    g.add_argument("--method", default="simclr", choices=METHODS, help="the base SSL method")
    g.add_argument("--proj_hidden_dim", type=int, default=S, help="projector hidden width")
    g.add_argument("--pred_hidden_dim", type=int, default=S, help="BYOL/SimSiam predictor hidden width")
    g.add_argument("--proj_output_dim", type=int, default=S, help="embedding size")
    g.add_argument("--temperature", type=float, default=0.2, help="T of SimCLR's NT-Xent (0.1–0.5)")
    g.add_argument("--simsiam_unmasked", action=on_off, default=S, help="SimSiam: add the unmasked pair")
    g.add_argument("--simsiam_masked_targets", action=on_off, default=S, help="SimSiam: add clean p vs masked z")
    g.add_argument("--simsiam_both_masked", action=on_off, default=S, help="SimSiam: add masked p vs masked z")
    g.add_argument("--no_gather", action="store_true", help="SimCLR negatives from the local batch only "
                   "(as the released code); default: from every rank")
    g = p.add_argument_group("masks: the occlusion model M_φ")
    g.add_argument("--num_masks", type=int, default=S, help="N, masks per image (2–8); 0 = the plain base method")
    g.add_argument("--single_mask", action=on_off, default=S, help="ADIOS-s: one random slot per image")
    g.add_argument("--alpha", type=float, default=S, help="α, sparsity-penalty weight (0–2)")
    g.add_argument("--alpha_entropy", type=float, default=S, help="α₂, weight of the slot-area entropy in the "
                   "masker's objective (0; two released runs use 0.71 and 0.29)")
    g.add_argument("--mask_lr", type=float, default=S, help="masker learning rate")
    g.add_argument("--mask_channels", type=int, default=S, help="c, the U-Net base width (8–128)")
    g.add_argument("--mask_norm", default=S, choices=NORMS, help="U-Net normalisation")
    g.add_argument("--mask_blocks", type=int, default=S, help="K, the U-Net depth (default log2(img_size) − 1: "
                   "4 at 32 px, 5 at 96, 6 at 224; four released SimSiam runs use 4)")
    g.add_argument("--mask_type", default="adios", choices=("adios", "random", "block"),
                   help="adios: learned masks; random: 75%% of a patch grid (MAE-like); block: ~30%% in "
                        "rectangles (BEiT-like); the last two have no masker step")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many iterations (smoke runs)")
    g.add_argument("--batch_size", type=int, default=S, help="images per process (default: the recipe's "
                   "batch, a global batch, divided among the processes)")
    g.add_argument("--lr", type=float, default=S, help="encoder base learning rate (after warmup)")
    g.add_argument("--weight_decay", type=float, default=S, help="both players (not biases, norms)")
    g.add_argument("--optimizer", default=S, choices=("sgd", "lars"), help="SGD momentum 0.9, or LARS (η 0.02)")
    g.add_argument("--warmup_epochs", type=int, default=S, help="linear warmup from 0.003, then cosine")
    g.add_argument("--encoder_early_end", type=int, default=S, help="the encoder's warmup-cosine ends this many "
                   "epochs before the masker's (the released BYOL runs: 10)")
    g.add_argument("--classifier_lr", type=float, default=0.1, help="online linear probe learning rate")
    g = p.add_argument_group("system")
    g.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype (default: bf16 on GPUs that have it, else fp32)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--channels_last", action=on_off, default=None,
                   help="NHWC memory format for both players (default: on for CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder and masker (GPU)")
    g.add_argument("--sync_bn", action=on_off, default=True,
                   help="with several processes, BatchNorm statistics over the global batch, still per slot "
                        "(encoders.SlotSyncBatchNorm); --no-sync_bn keeps each process's own")
    g.add_argument("--collective_timeout", type=float, default=None, metavar="MIN", help="with several "
                   "processes, minutes a collective waits for one that stopped answering (a machine powered off) "
                   "before the run ends (default torch's: 10 for NCCL, 30 for gloo); above an epoch-end's evaluation")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output_dir", default=None, help="default: runs/<dataset>_<method>_<arch>, plus what else "
                   "sets the run apart (mask scheme, image size, seed, then each shaping flag unlike the recipe's)")
    g.add_argument("--resume", action="store_true", help="require a checkpoint to continue: without "
                   "OUTPUT_DIR/checkpoint.pth, stop in one line instead of starting anew (with or without it, a "
                   "run continues its checkpoint when every shaping flag matches)")
    g.add_argument("--save_every", type=int, default=0, help="also keep checkpoint_epochNNN.pth every K epochs")
    g.add_argument("--log_every", type=int, default=None, help="read the step statistics (NaN check, progress bar, "
                   "stop agreement between processes) every K steps, the host waiting for the GPU only then "
                   "(default: 20 on CUDA; 1 on the CPU, which never runs ahead of itself)")
    g.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    return p


def parse_args(argv):
    """train.py's arguments with every default filled in, or one line on stderr and exit 2."""
    args = resolve_args(get_args_parser().parse_args(argv))
    if problem := train_args_problem(args):
        fail(problem)
    return args


def resolve_args(args):
    """Fill every flag the user did not give: from the matching released run if any, else DEFAULTS. The
    recipe's (or the default) batch is the global batch: divided among torchrun's WORLD_SIZE processes."""
    given = vars(args)
    usual, args.recipe = settings_for(args.dataset, args.method, args.arch, given.get("img_size"))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if "batch_size" not in given:
        batch = usual["batch_size"]
        if batch % world:
            fail(f"the global batch {batch} does not divide among {world} processes: give --batch_size, the "
                 f"images per process (e.g. {max(batch // world, 2)}, a global batch of {max(batch // world, 2) * world})")
        given["batch_size"] = batch // world
    for key, value in usual.items():
        given.setdefault(key, value)
    info = data.DATASETS.get(args.dataset, {})
    if args.img_size is None:
        args.img_size = info.get("img_size", 0)
    if args.mask_blocks is None and args.img_size > 0:
        args.mask_blocks = int(math.log2(args.img_size) - 1)
    if args.jitter is None:
        args.jitter = list(info.get("jitter", data.DEFAULT_JITTER))
    if args.dataset == "shapes" and args.stem is None:
        args.stem = "standard"
    args.stem = args.stem or "auto"
    if args.workers is None:
        args.workers = default_workers(args.device)
    if args.mask_type != "adios":
        args.num_masks = 1          # fixed random/block masks: one slot, the hidden part
    args.data_version = shapes.VERSION if args.dataset == "shapes" else None     # compared on resume
    if args.output_dir is None:
        args.output_dir = default_output_dir(args)
    return args


def default_output_dir(args):
    """runs/<dataset>_<method>_<arch>, plus what else sets the run apart: runs/shapes_simclr_resnet18,
    runs/stl10_byol_resnet18_base (N = 0), runs/imagenet100-96px_simclr_resnet18_adios-s_seed1, then each
    shaping flag (checkpoint.py:SHAPING) that differs from the recipe: runs/shapes_simclr_resnet18_alpha0.5."""
    name = [args.dataset, args.method, args.arch]
    if args.img_size != data.DATASETS.get(args.dataset, {}).get("img_size", args.img_size):
        name[0] += f"-{args.img_size}px"
    if args.mask_type != "adios":
        name.append(args.mask_type)
    elif args.num_masks == 0:
        name.append("base")
    elif args.single_mask:
        name.append("adios-s")
    if args.seed:
        name.append(f"seed{args.seed}")
    return os.path.join("runs", "_".join(name + flags_apart_from_recipe(args)))


def flags_apart_from_recipe(args):
    """The shaping flags whose value is not the recipe's for this dataset, method, arch, size, mask scheme
    and seed (those already name the folder), each as a short word: ['alpha0.5', 'lr1.0'], or one
    'flags-<hash>' word if they would make a long name."""
    same = ["--dataset", args.dataset, "--method", args.method, "--arch", args.arch, "--img_size", str(args.img_size),
            "--mask_type", args.mask_type, "--seed", str(args.seed), "--output_dir", "-", "--batch_size", "2"]
    same += ["--num_masks", "0"] if args.num_masks == 0 else ["--single_mask"] if args.single_mask else []
    recipe = vars(resolve_args(get_args_parser().parse_args(same)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    usual_batch = settings_for(args.dataset, args.method, args.arch, args.img_size)[0]["batch_size"]
    words = [f"batch{args.batch_size * world}"] if args.batch_size * world != usual_batch else []   # global
    for k in SHAPING:
        value, usual = getattr(args, k), recipe[k]
        if value != usual and k not in ("dataset", "method", "arch", "img_size", "mask_type", "seed", "batch_size"):
            if isinstance(value, bool):
                words.append(k if value else f"no-{k}")
            else:
                shown = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
                words.append(f"{k}{shown}")
    if len("_".join(words)) > 48:
        words = ["flags-" + hashlib.sha1(" ".join(words).encode()).hexdigest()[:8]]
    return words


def default_workers(device):
    """On a GPU, this machine's cores over the processes torchrun started on it: PIL augmentation is what
    limits a GPU run's input pipeline, so it gets every core. On the CPU the training itself needs the
    cores: one worker (on 2 cores, 2 workers made the demo's steps 25 % slower: README, "Performance")."""
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def fail(message):
    """Bad input: one line on stderr, exit code 2, before any work starts."""
    cli_checks.fail("train.py", message)


# ---- small helpers -------------------------------------------------------------------------------

def step_seed(seed, step, rank):
    """The torch seed of one iteration on one rank. Its random choices then depend on nothing else (not on
    evaluation between epochs, nor on where a run was resumed), like the views (data.SeededViews)."""
    return (seed * 1_000_003 + rank) * 100_000_007 + step


if __name__ == "__main__":
    main()
