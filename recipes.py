"""The released runs' settings, train.py's flags, and how the two combine (README "Recipes", "Quickstart").

The authors released one training script per run (one GPU each, so its batch is the global batch): their
values, to full precision, are the three tables below; a flag given on the command line wins, and without a
matching run the CPU demo's settings (shapes) or DEFAULTS fill in. train.py, supervised.py, bench.py and
released.py all read their arguments through `get_args_parser` and `resolve_args`.
"""
import argparse
import hashlib
import math
import os

import torch

import cli_checks
import data
import shapes
from adios import METHODS
from checkpoint import SHAPING
from cli_checks import Parser, train_args_problem
from encoders import ARCHS, STEMS
from masker import NORMS

# ---- recipes: the released runs ------------------------------------------------------------------
# ImageNet100 at 96 px is ImageNet100-S; at 224 px every run is ADIOS-s (recipe_for).
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
# The CPU demo (shapes, no recipe), ≤ 15 minutes on 2 cores: fourteen epochs, the probe rising on every seed
# tried; two masks keep a step affordable; α = 0.5 keeps the masks on the objects longer than α = 1 (README,
# "Quickstart"; docs/demo_design.md). Anything given on the command line wins.
SHAPES_DEFAULTS = dict(epochs=14, num_masks=2, alpha=0.5)


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


def get_args_parser(description=None):
    """train.py's parser (description: the --help text above the flags)."""
    p = Parser("train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        "(batchnorm.SlotSyncBatchNorm); --no-sync_bn keeps each process's own")
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
    g.add_argument("--tensorboard", action="store_true", help="also write the run's curves and mask pictures for "
                   "TensorBoard into --output_dir (needs: pip install tensorboard; README \"Reading the outputs\")")
    g.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    return p


def parse_args(argv, description=None):
    """train.py's arguments with every default filled in, or one line on stderr and exit 2."""
    args = resolve_args(get_args_parser(description).parse_args(argv))
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
