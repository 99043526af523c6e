"""Train ADIOS: the inference model and the occlusion model take alternating steps (Sec. 2).

    python train.py                                            # CPU, embedded shapes data, minutes
    python train.py --dataset stl10 --download                 # one GPU, the STL10 SimCLR recipe
    torchrun --nproc_per_node=4 train.py --dataset stl10       # four GPUs, batch 256 per GPU

A run continues from OUTPUT_DIR/checkpoint.pth whenever one is there, so the same command, rerun or
restarted by `torchrun --max_restarts`, picks up after a crash or SIGTERM. A checkpoint is written at
every epoch's end and when SIGTERM/SIGINT arrives (after the current iteration).

Each iteration: the encoder step (f_θ minimises Σ_n L_ssl with the masks fixed, plus the online
probe), then the masker step (M_φ minimises −Σ_n L_ssl + α·P through the frozen f_θ), then BYOL's
EMA update. README: "Quickstart", "Recipes", "Reading the outputs", "When things go wrong".
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import cli_checks
import data
import gpu_augment
from adios import ADIOS, METHODS, byol_tau
from encoders import ARCHS, STEMS, build_encoder
from checkpoint import checkpoint_state, load_for_resume, save_checkpoint
from cli_checks import Parser, output_dir_problem, train_args_problem
from eval_linear import shapes_mask_quality
from masker import NORMS, BlockMasker, Masker, RandomPatchMasker
from optim import make_optimizer, param_groups, set_learning_rates

# The released runs, as the table of ADIOS_SPEC.md §7 (one GPU each; the batch is per GPU here).
# A flag given on the command line wins over these.
RECIPE_COLUMNS = ("epochs", "batch_size", "lr", "mask_lr", "weight_decay", "alpha", "num_masks", "mask_channels",
                  "proj_hidden_dim", "pred_hidden_dim", "proj_output_dim")
RECIPES = {  #                                   ep   B    lr     mask_lr wd      α     N  c    proj  pred  out
    ("stl10", "simclr", "resnet18"):            (400, 256, 0.132, 0.0195, 8.5e-5, 0.0,  6, 128, 2048, None, 256),
    ("stl10", "byol", "resnet18"):              (400, 128, 0.292, 0.0928, 9.9e-6, 1.72, 6, 64,  4096, 8192, 256),
    ("stl10", "simsiam", "resnet18"):           (400, 128, 0.444, 0.0383, 7.2e-6, 1.0,  6, 32,  2048, 512,  256),
    ("stl10", "simclr", "vit_tiny"):            (200, 128, 0.103, 0.0941, 1e-4,   0.39, 4, 32,  2048, None, 128),
    ("imagenet100_96", "simclr", "resnet18"):   (500, 128, 0.111, 0.0145, 1e-4,   0.92, 4, 32,  2048, None, 128),
    ("imagenet100_96", "byol", "resnet18"):     (500, 128, 0.241, 0.066,  1e-5,   0.40, 6, 16,  4096, 8192, 256),
    ("imagenet100_224", "simclr", "resnet18"):  (400, 128, 0.190, 0.499,  1e-4,   0.75, 4, 8,   2048, None, 128),
}
# What the table's columns do not hold: SimSiam's unmasked pair and jitter, InstanceNorm, ADIOS-s.
RECIPE_EXTRAS = {
    ("stl10", "simsiam", "resnet18"): dict(simsiam_unmasked=True, jitter=[0.55, 0.48, 0.58, 0.2]),
    ("imagenet100_96", "simclr", "resnet18"): dict(mask_norm="in"),
    ("imagenet100_224", "simclr", "resnet18"): dict(single_mask=True),
}
# Released runs all use LARS and a 10-epoch warmup; these apply to every recipe.
RECIPE_COMMON = dict(optimizer="lars", warmup_epochs=10)
# Without a recipe (the CPU demo on shapes, or any other combination).
DEFAULTS = dict(epochs=6, batch_size=64, lr=0.3, mask_lr=0.05, weight_decay=1e-5, alpha=1.0, num_masks=4,
                mask_channels=16, mask_norm="gn", single_mask=False, proj_hidden_dim=512, pred_hidden_dim=None,
                proj_output_dim=128, simsiam_unmasked=False, jitter=None, optimizer="lars", warmup_epochs=1,
                img_size=None, stem=None)


def get_args_parser():
    p = Parser("train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS    # recipe-controlled flags: absent from args unless given (see resolve_args)
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
                   help="colour jitter strengths (default: the dataset's; 0.8 0.8 0.8 0.2 as in the paper)")
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
    g.add_argument("--simsiam_unmasked", action="store_true", default=S, help="SimSiam: add the unmasked pair")
    g.add_argument("--simsiam_masked_targets", action="store_true", help="SimSiam: add clean p vs masked z")
    g.add_argument("--simsiam_both_masked", action="store_true", help="SimSiam: add masked p vs masked z")
    g.add_argument("--no_gather", action="store_true", help="SimCLR negatives from the local batch only "
                   "(as the released code); default: from every rank")
    g = p.add_argument_group("masks: the occlusion model M_φ")
    g.add_argument("--num_masks", type=int, default=S, help="N, masks per image (2–8); 0 = the plain base method")
    g.add_argument("--single_mask", action="store_true", default=S, help="ADIOS-s: one random slot per image")
    g.add_argument("--alpha", type=float, default=S, help="α, sparsity-penalty weight (0–2)")
    g.add_argument("--mask_lr", type=float, default=S, help="masker learning rate")
    g.add_argument("--mask_channels", type=int, default=S, help="c, the U-Net base width (8–128)")
    g.add_argument("--mask_norm", default=S, choices=NORMS, help="U-Net normalisation")
    g.add_argument("--mask_type", default="adios", choices=("adios", "random", "block"),
                   help="adios: learned masks; random: 75%% of a patch grid (MAE-like); block: ~30%% in "
                        "rectangles (BEiT-like); the last two have no masker step")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many iterations (smoke runs)")
    g.add_argument("--batch_size", type=int, default=S, help="images per process")
    g.add_argument("--lr", type=float, default=S, help="encoder base learning rate (after warmup)")
    g.add_argument("--weight_decay", type=float, default=S, help="both players (not biases, norms)")
    g.add_argument("--optimizer", default=S, choices=("sgd", "lars"), help="SGD momentum 0.9, or LARS (η 0.02)")
    g.add_argument("--warmup_epochs", type=int, default=S, help="linear warmup from 0.003, then cosine")
    g.add_argument("--classifier_lr", type=float, default=0.1, help="online linear probe learning rate")
    g = p.add_argument_group("system")
    g.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype (default: bf16 on GPUs that have it, else fp32)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for both players (default: on for CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the encoder and masker (GPU)")
    g.add_argument("--sync_bn", action=argparse.BooleanOptionalAction, default=True,
                   help="with several processes, BatchNorm statistics over the global batch, still per slot "
                        "(encoders.SlotSyncBatchNorm); --no-sync_bn keeps each process's own")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output_dir", default="./runs/adios")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth (automatic "
                   "whenever it exists; this flag only says so when it does not)")
    g.add_argument("--save_every", type=int, default=0, help="also keep checkpoint_epochNNN.pth every K epochs")
    g.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    return p


def recipe_for(dataset, method, arch, img_size):
    """The released run matching this choice, or {} (ImageNet100 is keyed by its image size)."""
    key = f"imagenet100_{img_size or 224}" if dataset == "imagenet100" else dataset
    if (key, method, arch) not in RECIPES:
        return {}
    return {**RECIPE_COMMON, **dict(zip(RECIPE_COLUMNS, RECIPES[key, method, arch])),
            **RECIPE_EXTRAS.get((key, method, arch), {})}


def resolve_args(args):
    """Fill every flag the user did not give: from the recipe of spec §7 if one matches, else DEFAULTS."""
    given = vars(args)
    recipe = recipe_for(args.dataset, args.method, args.arch, given.get("img_size"))
    for key, value in {**DEFAULTS, **recipe}.items():
        given.setdefault(key, value)
    args.recipe = bool(recipe)
    if args.img_size is None:
        args.img_size = data.DATASETS[args.dataset]["img_size"] if args.dataset in data.DATASETS else 0
    if args.dataset == "shapes" and args.stem is None:
        args.stem = "standard"
    args.stem = args.stem or "auto"
    if args.workers is None:
        args.workers = default_workers()
    if args.mask_type != "adios":
        args.num_masks = 1          # fixed random/block masks: one slot, the hidden part
    return args


def default_workers():
    """This machine's cores over the processes torchrun started on it: PIL augmentation is what limits a
    GPU run's input pipeline, so it gets every core (2 workers on a 2-core CPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def fail(message):
    """Bad input: one line on stderr, exit code 2, before any work starts."""
    cli_checks.fail("train.py", message)


# ---- distributed, schedule, optimiser -------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world size, device) from torchrun's environment; one process when RANK is not set."""
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu")


def build_train_loader(args, info, device, download):
    """Batches ((x_a, x_b), labels) of this rank's share: PIL augmentation in CPU workers, or with
    --gpu_aug the whole uint8 split on the device, augmented there (gpu_augment.GPULoader)."""
    if not args.gpu_aug:
        train_set = data.build_pretrain_dataset(args.dataset, args.data_dir, args.img_size, download,
                                                args.jitter, args.num_images, args.seed)
        return data.build_loader(train_set, args.batch_size, args.workers, seed=args.seed)
    images, labels = gpu_augment.load_uint8(args.dataset, args.data_dir, args.img_size, download, args.num_images,
                                     args.seed, with_labels=True)
    jitter = args.jitter or info.get("jitter", data.DEFAULT_JITTER)
    augment = gpu_augment.GPUAugment(args.img_size, info["mean"], info["std"], jitter,
                              info.get("crop_scale", (0.08, 1.0))).to(device)
    return gpu_augment.GPULoader(images.to(device), labels, args.batch_size, augment, seed=args.seed)


# ---- models and optimisers ----------------------------------------------------------------------

def build_model(args, num_classes, world=1, device=torch.device("cpu")):
    """ADIOS with the chosen backbone, heads and masker (or a fixed-mask baseline), on device."""
    encoder, feat_dim = build_encoder(args.arch, args.img_size, args.stem)
    if args.mask_type == "random":
        masker = RandomPatchMasker(args.img_size)
    elif args.mask_type == "block":
        masker = BlockMasker(args.img_size)
    else:
        masker = Masker(args.num_masks, args.img_size, args.mask_channels, args.mask_norm) if args.num_masks else None
    model = ADIOS(encoder, feat_dim, masker, method=args.method, alpha=args.alpha, temperature=args.temperature,
                  single_mask=args.single_mask, proj_hidden_dim=args.proj_hidden_dim,
                  proj_output_dim=args.proj_output_dim, pred_hidden_dim=args.pred_hidden_dim,
                  num_classes=num_classes, simsiam_unmasked=args.simsiam_unmasked,
                  simsiam_masked_targets=args.simsiam_masked_targets,
                  simsiam_both_masked=args.simsiam_both_masked, gather_negatives=not args.no_gather)
    model.to(device)
    if args.channels_last:    # every module, the masker too: with the encoder alone in NHWC, fp32 gradients on
        model.to(memory_format=torch.channels_last)   # CPU were 4e-3 from float64's, not 2e-5 (mixed-layout kernels)
    if args.compile:                                          # in place: state_dict keys unchanged
        model.net.encoder.compile()
        if isinstance(model.masker, Masker):
            model.masker.compile()
    if world > 1:      # SyncBatchNorm (per slot) on GPUs: statistics over the global batch
        on_gpu = device.type == "cuda"
        model.distribute(device_ids=[device.index] if on_gpu else None, sync_batchnorm=args.sync_bn and on_gpu)
    return model


def build_optimizers(model, args):
    """(encoder-side optimiser, masker optimiser or None): the two players' own optimisers (spec §7)."""
    net = model.net
    groups = param_groups(net.encoder, args.lr, args.weight_decay) + \
        param_groups(net.projector, args.lr, args.weight_decay)
    if net.predictor is not None:       # SimSiam's predictor keeps its rate (as in SimSiam)
        groups += param_groups(net.predictor, args.lr, args.weight_decay, fixed_lr=args.method == "simsiam")
    if net.classifier is not None:      # the online probe: its own rate, no decay (LARS tames its steps)
        groups += param_groups(net.classifier, args.classifier_lr, 0.0)
    opt_enc = make_optimizer(groups, args.optimizer, args.lr)
    learned = args.mask_type == "adios" and model.masker is not None
    opt_mask = make_optimizer(param_groups(model.masker, args.mask_lr, args.weight_decay), args.optimizer,
                              args.mask_lr) if learned else None
    return opt_enc, opt_mask


# ---- checkpoints, logs, pictures --------------------------------------------------------------

@torch.no_grad()
def save_mask_picture(model, images, mean, std, path):
    """A grid with one row per image: the image, its N masks, then the N masked images (denormalised)."""
    masks = model.masker(images).float()                       # (B, N, H, W)
    B, N = masks.shape[:2]
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    show = lambda x: (x.float().cpu() * std + mean).clamp(0, 1)
    tiles = [show(images).unsqueeze(1),                                    # (B, 1, 3, H, W)
             masks.cpu().unsqueeze(2).expand(-1, -1, 3, -1, -1),            # (B, N, 3, H, W)
             show(images.unsqueeze(1) * (1 - masks.unsqueeze(2)))]          # (B, N, 3, H, W)
    grid = torch.cat(tiles, dim=1).flatten(0, 1)                           # (B·(1+2N), 3, H, W)
    save_image(make_grid(grid, nrow=1 + 2 * N, padding=1, pad_value=1.0), path)


@torch.no_grad()
def probe_top1(model, loader, device, autocast):
    """Top-1 of the online linear probe on the held-out split (encoder in eval mode)."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast:
            logits = model.net(images.to(device), classify=True)[3]
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    model.train()
    return correct / max(total, 1)


class Averager:
    """Running means of the per-step stats dicts, for the epoch's log line."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, stats):
        self.count += 1
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self):
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def step_seed(seed, step, rank):
    """The torch seed of one iteration on one rank. Its random choices then depend on nothing else (not on
    evaluation between epochs, nor on where a run was resumed), like the views (data.SeededViews)."""
    return (seed * 1_000_003 + rank) * 100_000_007 + step


def first_non_finite(enc, msk):
    """Name of the first loss term that is NaN or infinite this iteration, or None."""
    terms = [("encoder loss", enc.get("ssl_loss")), ("online probe loss", enc.get("online_ce")),
             ("masker loss", msk.get("ssl_loss")), ("sparsity penalty", msk.get("penalty"))]
    return next((name for name, v in terms if v is not None and not math.isfinite(v)), None)


def first_non_finite_weight(model):
    """Name of the first parameter holding a NaN or infinity, or None: a non-finite gradient can spoil
    the weights while the loss that produced it was finite, so this is checked before every save."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def agree(flags, world, device):
    """Each flag True on every rank if it is True on any (a non-finite loss, a stop request)."""
    if world == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


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


def train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, epoch, step, last_step, schedule, args,
                    device, stop, is_main):
    """One pass over this rank's share of the data (what is left of it, after a mid-epoch resume).
    Returns (mean stats, global step)."""
    model.train()
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    avg, lrs = Averager(), {}
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", disable=not is_main, leave=False)
    for (x_a, x_b), labels in loader:
        if step >= last_step:
            break
        for opt in (opt_enc, opt_mask):
            if opt is not None:
                set_learning_rates(opt, step, **schedule)
        x_a, x_b, labels = x_a.to(device, non_blocking=True), x_b.to(device, non_blocking=True), labels.to(device)

        torch.manual_seed(step_seed(args.seed, step, rank))   # ADIOS-s slots, random/block masks
        enc, msk = adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, amp)
        if model.method == "byol":
            model.momentum_update(byol_tau(step, schedule["total"]))
        step += 1

        bad = first_non_finite(enc, msk)
        any_bad, any_stop = agree([bad is not None, stop["signal"] is not None], world, device)
        if any_bad:
            print(f"train.py: error: non-finite {bad or 'loss on another rank'} at step {step} (epoch {epoch}); "
                  "stopped without saving, the last checkpoint is intact. Lower --lr or --mask_lr, raise "
                  "--alpha, or use --precision fp32", file=sys.stderr)
            sys.exit(1)
        avg.add({**{f"enc_{k}": v for k, v in enc.items()}, **{f"mask_{k}": v for k, v in msk.items()}})
        lrs = dict(lr=opt_enc.param_groups[0]["lr"], mask_lr=opt_mask.param_groups[0]["lr"] if opt_mask else 0.0)
        bar.update()
        bar.set_postfix(loss=f"{enc['ssl_loss']:.3f}", refresh=False)
        if any_stop:                       # every rank stops after this same iteration
            stop["signal"] = stop["signal"] or "on another rank"
            break
    bar.close()
    return {**avg.means(), **lrs}, step


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None):
    args = resolve_args(get_args_parser().parse_args(argv))
    if problem := train_args_problem(args):
        fail(problem)
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    args.world_size = world
    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if args.precision == "bf16" and not bf16_ok:
        fail(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --precision fp16 or fp32")
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    if is_main:
        print(f"world size {world}, global batch {args.batch_size * world}, device {device}, "
              f"precision {args.precision}, recipe {'spec §7' if args.recipe else 'defaults'}")
        print(json.dumps(vars(args), indent=1))
    if args.dry_run:
        return vars(args)
    if problem := output_dir_problem(args.output_dir):
        fail(problem)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    # Resume whenever there is a checkpoint: rerunning the command (or torchrun restarting it) continues.
    resume, problem = load_for_resume(ckpt_path, args) if os.path.exists(ckpt_path) else (None, None)
    if problem:
        fail(problem)
    if args.resume and resume is None and is_main:
        print(f"--resume: no checkpoint at {ckpt_path} yet, starting from scratch")

    # ---- data ----
    info = data.dataset_info(args.dataset)
    try:
        if world > 1 and args.download and not is_main:      # rank 0 downloads, the others wait for it
            dist.barrier()
        loader = build_train_loader(args, info, device, download=args.download and is_main)
        if world > 1 and args.download and is_main:
            dist.barrier()
        _, val_set, num_classes = data.build_eval_datasets(args.dataset, args.data_dir, args.img_size,
                                                           num_images=args.num_images, seed=args.seed)
        if args.dataset in ("imagenet100", "imagefolder") and is_main:
            print(f"checked {data.find_bad_images(args.data_dir)} images under {args.data_dir}")
    except data.DataError as e:
        fail(str(e))
    if len(loader) == 0:
        fail(f"--batch_size {args.batch_size} × {world} processes exceeds the {len(loader.sampler.dataset)} "
             "training images: lower --batch_size")
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=min(args.workers, 2))
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
        if is_main:
            print(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")

    # ---- train ----
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    last_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    schedule = dict(warmup=args.warmup_epochs * steps_per_epoch, total=total_steps)
    stop = {"signal": None}
    handlers = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    log = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            if step >= last_step:
                break
            loader.sampler.set_epoch(epoch)          # this epoch's order and, seeded per image, its views
            # Resuming mid-epoch: skip, unloaded, the images of this epoch's order already trained on.
            loader.sampler.start = (step - epoch * steps_per_epoch) * args.batch_size
            start_time, start_step = time.time(), step
            stats, step = train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, epoch, step, last_step,
                                          schedule, args, device, stop, is_main)
            loader.sampler.start = 0
            finished = step == (epoch + 1) * steps_per_epoch
            epoch_done = epoch + 1 if finished else epoch
            bad = first_non_finite_weight(model)    # the same weights on every rank: all stop together
            if bad is not None:
                print(f"train.py: error: non-finite weights in {bad} after step {step} (epoch {epoch}); stopped "
                      "without saving, the last checkpoint is intact. Lower --lr or --mask_lr, or use "
                      "--precision fp32", file=sys.stderr)
                sys.exit(1)
            if is_main:
                seen = (step - start_step) * args.batch_size * world
                log = dict(epoch=epoch, step=step, **stats, images_per_s=seen / (time.time() - start_time),
                           online_top1=probe_top1(model, val_loader, device, amp()))
                if args.dataset == "shapes" and isinstance(model.masker, Masker):      # true objects known
                    quality = shapes_mask_quality(model.masker, min(256, len(val_set)), device, seed=args.seed)
                    log.update({f"mask_{k}": v for k, v in quality.items()})
                if model.masker is not None:
                    save_mask_picture(model, fixed, info["mean"], info["std"],
                                      os.path.join(args.output_dir, f"masks_epoch{epoch:03d}.png"))
                with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(log) + "\n")
                state = checkpoint_state(model, opt_enc, opt_mask, scaler, epoch_done, step, args)
                save_checkpoint(state, ckpt_path)
                if args.save_every and finished and epoch_done % args.save_every == 0:
                    save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint_epoch{epoch_done:03d}.pth"))
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in log.items()}))
            # Decide together (this also waits for rank 0's save): a signal that reached one rank during
            # the save must stop every rank here, not that one alone while the others train on without it.
            if agree([stop["signal"] is not None], world, device)[0]:
                stop["signal"] = stop["signal"] or "on another rank"
                if is_main:
                    print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, "
                          "rerun the same command to continue")
                break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    return log


if __name__ == "__main__":
    main()
