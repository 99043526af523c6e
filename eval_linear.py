"""Evaluate a frozen encoder: linear probe, kNN, and (on shapes) the quality of the learned masks.

The encoder is never changed: eval mode (BatchNorm uses and keeps its running statistics), requires_grad
off, every forward under torch.no_grad() (and fp16 autocast on CUDA, as the released evaluation).

    # the fast default: features computed once, the linear head trained on them (minutes on a CPU)
    python eval_linear.py --ckpt runs/shapes_simclr_resnet18/checkpoint.pth --dataset shapes --knn
    # the released protocol, behind the paper's numbers: augmented views, encoder re-run each epoch (one GPU)
    python eval_linear.py --ckpt runs/stl10_simclr_resnet18/checkpoint.pth --dataset stl10 --augment --knn
    # transfer: a 96-px STL10 encoder on CIFAR10, whose images are resized to 96 px
    python eval_linear.py --ckpt runs/stl10_simclr_resnet18/checkpoint.pth --dataset cifar10 --data_dir data
    # robustness: train on one image folder, test on several (the Backgrounds Challenge, README "Recipes")
    python eval_linear.py --ckpt runs/imagenet100-96px_simclr_resnet18/checkpoint.pth --dataset imagefolder \
        --data_dir original --test_dirs bg_challenge/original bg_challenge/mixed_same bg_challenge/mixed_rand
    # the floor: an untrained encoder
    python eval_linear.py --random_init --arch resnet18 --img_size 32 --stem standard --dataset shapes

Linear probe: a Linear head, cross-entropy, 100 epochs, batch 128, SGD lr 0.1, momentum 0.9, no weight
decay, lr ×0.1 at 60 % and 80 % of the epochs (60 and 80 of 100). Two protocols:
  --augment, as the released code (the paper's numbers): SGD inside LARS, η = 1e-3, no clipping (each
    weight step ≈ lr·η·‖W‖; the bias plain SGD); train views RandomResizedCrop + flip; fp16 on CUDA.
  default, fast: the test view of every image encoded once; the head sees these cached features through
    Standardize (the train split's statistics: still one linear classifier), which plain SGD needs.
kNN: cosine similarity of L2-normalised backbone features, the labelled train split as memory bank, the
k = 20 nearest vote with weight exp(sim / T), T = 0.07 (InstDisc, Wu et al. 2018; DINO): fixed, never
tuned on the test set. Accuracies are in %. Writes a JSON file of the results (see `main`; README
"Reading the outputs"). README: "Recipes", "Evidence on shapes".
"""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import cli_checks
import released
from cli_checks import Parser, eval_args_problem
from batchnorm import precise_batchnorm
from checkpoint import learned_masker
from data import DATASETS, DataError, build_eval_datasets, build_test_folders
from encoders import ARCHS, STEMS, build_encoder
from mask_quality import shapes_mask_quality
from optim import LARS, param_groups

KNN_K, KNN_T = 20, 0.07                   # fixed kNN neighbours and temperature (never tuned on test)
LARS_ETA = 1e-3                           # the released linear probe's LARS trust coefficient, no clipping


def fail(message):
    """One line on stderr and exit code 2: no traceback for user mistakes."""
    cli_checks.fail("eval_linear.py", message)


def get_args_parser():
    p = Parser("eval_linear.py", description=__doc__.split("\n")[0])
    # encoder: a checkpoint of train.py, or an untrained one
    p.add_argument("--ckpt", help="checkpoint written by train.py (its `encoder` and `args` are used), or an "
                   "authors' released run: its unpacked folder or its .ckpt (released.py)")
    p.add_argument("--random_init", action="store_true", help="evaluate an untrained encoder (the floor)")
    p.add_argument("--arch", choices=ARCHS, help="encoder of --random_init (a checkpoint names its own)")
    p.add_argument("--stem", choices=STEMS, default="auto", help="ResNet stem of --random_init")
    # data
    p.add_argument("--dataset", default="stl10", choices=list(DATASETS))
    p.add_argument("--data_dir", default=None, help="dataset root (default: the checkpoint's, else data)")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--img_size", type=int, default=None,
                   help="eval images are resized to this (default: the encoder's own size; with "
                        "--random_init, the dataset's). A ViT only takes its own size")
    p.add_argument("--num_images", type=int, default=None, help="shapes: train images (test: a quarter)")
    p.add_argument("--test_dirs", nargs="+", default=None, metavar="DIR",
                   help="with --dataset imagefolder or imagenet100: more test sets for the same probe, each "
                        "DIR/val/<class>/<image> (the Backgrounds Challenge's bg_challenge/mixed_rand, ...) or "
                        "DIR/<class>/<image>, class folders named as under --data_dir/train")
    # protocol
    p.add_argument("--augment", action="store_true",
                   help="the released protocol (the paper's numbers): RandomResizedCrop + flip, LARS "
                        "(η = 1e-3), encoder re-run each epoch (slow on CPU)")
    p.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (100; 0 skips the probe)")
    p.add_argument("--lr", type=float, default=0.1, help="linear-probe SGD learning rate (0.1)")
    p.add_argument("--batch_size", type=int, default=128, help="linear-probe batch (128)")
    p.add_argument("--bn_head", action="store_true",
                   help="a non-affine BatchNorm before the Linear (MAE's linear probing; still a linear "
                        "classifier). The cached-feature probe standardises its features anyway")
    p.add_argument("--knn", action="store_true", help=f"also the weighted kNN (k={KNN_K}, T={KNN_T})")
    p.add_argument("--precise_bn", type=int, default=0, metavar="BATCHES",
                   help="first recompute the encoder's BatchNorm statistics as the cumulative average over "
                        "BATCHES batches (--batch_size) of clean training images (0, the default: keep the "
                        "checkpoint's running averages)")
    p.add_argument("--mask_images", type=int, default=256,
                   help="shapes test images for the mask quality of a learned masker (0: skip)")
    # system
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="head init, shuffling, shapes generator")
    p.add_argument("--output", default=None, help="JSON file (default: eval_<dataset>.json beside --ckpt)")
    p.add_argument("--output_dir", default=None, help="where --random_init writes (default runs/random_<arch>)")
    return p


# ---- the frozen encoder (and masker) from a checkpoint ---------------------------------------

def load_checkpoint(path):
    """The checkpoint dict of train.py (a released run: the same keys, from released.load_released), or
    exit with one line naming --ckpt."""
    if released.is_released_path(path) and os.path.exists(path):
        try:
            model, train_args = released.load_released(path)
        except released.ReleasedError as e:
            fail(f"--ckpt {path}: {e}")
        return dict(encoder=model.encoder.state_dict(), model=model.state_dict(), args=vars(train_args))
    if not os.path.isfile(path):
        fail(f"--ckpt {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                    # pickle, zip or permission errors
        fail(f"--ckpt {path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    missing = [k for k in ("encoder", "args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        fail(f"--ckpt {path} lacks {', '.join(missing)}: is it a checkpoint of train.py?")
    return ckpt


def frozen_encoder(arch, img_size, stem, state_dict=None):
    """(backbone, feat_dim) in eval mode with requires_grad off: nothing below may change it."""
    encoder, feat_dim = build_encoder(arch, img_size, stem=stem)
    if state_dict is not None:
        encoder.load_state_dict(state_dict)
    return encoder.eval().requires_grad_(False), feat_dim


# ---- features ----------------------------------------------------------------------------------

def fp16(device):
    """fp16 autocast on CUDA, as the released evaluation (precision 16); a no-op on CPU."""
    return torch.autocast(device.type, torch.float16, enabled=device.type == "cuda")


@torch.no_grad()                                              # the encoder is frozen: no graph, no grad
def extract_features(encoder, dataset, batch_size, workers, device, desc):
    """Backbone features of a whole dataset in order: (n, D) float32 on `device`, labels (n,) int64."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        with fp16(device):
            feats.append(encoder(x.to(device, non_blocking=True)).float())    # (b, D)
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).to(device)


def cached_batches(feats, labels, batch_size, generator):
    """One epoch over cached features: shuffled minibatches of (b, D) features and (b,) labels."""
    order = torch.randperm(len(feats), generator=generator).to(feats.device)
    for start in range(0, len(feats), batch_size):
        idx = order[start:start + batch_size]
        yield feats[idx], labels[idx]


def augmented_batches(encoder, loader, device):
    """One epoch of the full protocol: fresh random crops, encoded by the frozen encoder."""
    for x, y in loader:
        with torch.no_grad(), fp16(device):                   # frozen encoder: only the head learns
            feats = encoder(x.to(device, non_blocking=True)).float()       # (b, D)
        yield feats, torch.as_tensor(y).to(device)


class Standardize(nn.Module):
    """x -> (x - mean) @ M: features standardised with the train split's statistics, no direction's
    variance above 1.

    Fixed from the train features (n, D) and applied as is to test features; an affine map, so the head
    Linear(Standardize(x)) is still one linear classifier of x. Two steps, folded into M (D, D):
    1. per dimension, (x - mean) / std (a dimension that hardly varies keeps std ≥ 1 % of the mean std,
       so a ReLU unit dead on train but alive on test stays finite): the average variance is now 1;
    2. each principal direction of these standardised train features whose variance λ exceeds
       max_variance (1: the average) is scaled by sqrt(max_variance / λ); the others are left alone.
    Why: a trained encoder's features vary together. Raw, they share one large mean direction (norms
    ~40 after the quickstart); standardised, the leading direction of a ResNet18 trained 3 epochs on
    shapes still had variance ~200 (then 96, 68, 43, 26, ...). SGD at lr 0.1 with momentum 0.9 kept the
    loss above chance along such directions until the lr dropped (oscillation above ~76, gradient noise
    below it); capped, the loss fell below chance in the first epochs, the test accuracy unchanged.
    """

    def __init__(self, train_feats, max_variance=1.0):
        super().__init__()
        mean, std = train_feats.mean(dim=0), train_feats.std(dim=0)                   # (D,) each
        std = std.clamp(min=0.01 * std.mean().item() + 1e-12)
        z = (train_feats - mean) / std                                                # (n, D)
        covariance = (z.T @ z).double() / max(1, len(z) - 1)                         # (D, D)
        variance, directions = torch.linalg.eigh(covariance)                          # (D,), (D, D)
        cap = (max_variance / variance.clamp(min=1e-12)).sqrt().clamp(max=1.0)        # (D,) ≤ 1
        matrix = (directions * cap) @ directions.T / std.double()[:, None]            # diag(1/std) U diag(cap) Uᵀ
        self.register_buffer("mean", mean)
        self.register_buffer("matrix", matrix.to(train_feats.dtype))                   # (D, D)

    def forward(self, x):                                     # (b, D) -> (b, D)
        return (x - self.mean) @ self.matrix


# ---- linear probe ------------------------------------------------------------------------------

def probe_optimizer(head, lr, lars):
    """SGD, momentum 0.9, no weight decay. lars=True: inside LARS as the released linear probe, with
    η = 1e-3 and no clipping, so each weight tensor steps lr·η·‖W‖/‖g‖ · g (about lr·η·‖W‖ whatever
    the gradient's size); the bias (a 1-D tensor: optim.param_groups) takes plain SGD steps."""
    if lars:
        groups = [g for g in param_groups(head, lr, weight_decay=0.0) if g["params"]]
        return LARS(groups, lr=lr, momentum=0.9, eta=LARS_ETA, clip=False)
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0)


def train_linear_head(feat_dim, num_classes, epochs, lr, epoch_batches, device, bn=False, standardize=None,
                      lars=False, fp16_head=False):
    """A Linear(D, C) head trained with cross-entropy, returned in eval mode; epoch_batches() yields
    one epoch of (features, labels) batches. probe_optimizer(lars); lr ×0.1 at 60 % and 80 % of the
    epochs (as the released code). bn: a BatchNorm1d(D, affine=False) first (He et al., MAE, 2022);
    standardize: a fixed Standardize first. fp16_head: the head too under fp16 autocast, with a
    GradScaler (CUDA, --augment). The mean loss of every epoch is kept in head.epoch_losses.
    """
    head = nn.Linear(feat_dim, num_classes)
    if bn:
        head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), head)
    if standardize is not None:
        head = nn.Sequential(standardize, head)
    head.to(device).train()
    opt = probe_optimizer(head, lr, lars)
    milestones = [int(0.6 * epochs), int(0.8 * epochs)]       # 60 and 80 of 100
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16_head)
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for feats, labels in epoch_batches():
            with torch.autocast(device.type, torch.float16, enabled=fp16_head):
                loss = F.cross_entropy(head(feats), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()                     # scaled (fp16) so small gradients survive
            scaler.step(opt)                                  # unscales first; skips a step with inf/NaN
            scaler.update()
            total, count = total + loss.item() * len(labels), count + len(labels)
        sched.step()
        losses.append(total / count)
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:
            print(f"  probe epoch {epoch + 1}/{epochs}  loss {losses[-1]:.4f}  lr {opt.param_groups[0]['lr']:.4g}")
    head.epoch_losses = losses
    return head.eval()


def cached_linear_probe(train_feats, train_labels, num_classes, epochs, lr, batch_size, generator, bn=False):
    """The fast default probe: train_linear_head on cached train features (n, D) and labels (n,), which
    the head standardises with their own statistics (Standardize); plain SGD, shuffled by generator."""
    epoch_batches = lambda: cached_batches(train_feats, train_labels, batch_size, generator)  # noqa: E731
    return train_linear_head(train_feats.shape[1], num_classes, epochs, lr, epoch_batches, train_feats.device,
                             bn, standardize=Standardize(train_feats))


@torch.no_grad()
def topk_accuracy(logits, labels, k):
    """% of rows whose label is among the k highest logits. logits (n, C), labels (n,)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices                # (n, k)
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def accuracies(head, bank, feats, labels, num_classes):
    """{top1, top5, knn_top1} in % on one test set's features (n, D) and labels (n,): the probe's (head
    None: left None), the kNN's against bank = (train features, train labels) (None: left None). top5
    only with at least 10 classes."""
    top1 = top5 = knn = None
    if head is not None:
        logits = head(feats)                                  # (n, C)
        top1 = topk_accuracy(logits, labels, 1)
        top5 = topk_accuracy(logits, labels, 5) if num_classes >= 10 else None
    if bank is not None:
        knn = knn_top1(*bank, feats, labels, num_classes)
    return dict(top1=top1, top5=top5, knn_top1=knn)


# ---- kNN -----------------------------------------------------------------------------------------

@torch.no_grad()
def knn_top1(train_feats, train_labels, test_feats, test_labels, num_classes, k=KNN_K, T=KNN_T, chunk=256):
    """Weighted kNN top-1 (%): each of the k most cosine-similar train images votes exp(sim / T)."""
    bank = F.normalize(train_feats, dim=1)                    # (n_train, D), the memory bank
    correct = 0
    for start in range(0, len(test_feats), chunk):
        query = F.normalize(test_feats[start:start + chunk], dim=1)       # (b, D)
        sim, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)         # (b, k) each
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[idx], (sim / T).exp())         # (b, C)
        correct += (votes.argmax(dim=1) == test_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / len(test_feats)


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None):
    """Run the evaluation; returns the results dict that is also written as JSON:
    dataset, protocol ("cached-features" / "augmented"), optimizer ("sgd" / "lars"), img_size, top1,
    top5, knn_top1, probe_losses (mean loss of each epoch), test_dirs ({DIR: {images, top1, top5,
    knn_top1}} or None), mask_quality (dict or None), command, checkpoint, epoch, and a few sizes."""
    args = get_args_parser().parse_args(argv)
    command = " ".join(sys.argv if argv is None else ["eval_linear.py", *argv])

    if problem := eval_args_problem(args) or cli_checks.below_minimum(args, dict(precise_bn=0)):   # before any work
        fail(problem)
    ckpt = load_checkpoint(args.ckpt) if args.ckpt else None
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    # ---- encoder ----
    if ckpt is not None:
        train_args = ckpt["args"]
        arch, enc_size, stem = train_args["arch"], train_args["img_size"], train_args.get("stem", "auto")
        try:
            encoder, feat_dim = frozen_encoder(arch, enc_size, stem, ckpt["encoder"])
        except (RuntimeError, ValueError) as e:               # keys or shapes that do not fit
            fail(f"--ckpt {args.ckpt}: its encoder does not load into {arch} ({str(e).splitlines()[0]})")
        masker = learned_masker(ckpt)
        data_dir = args.data_dir or train_args.get("data_dir") or "data"
        run_dir = train_args["output_dir"] if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
        output = args.output or os.path.join(run_dir, f"eval_{args.dataset}")       # beside the checkpoint
    else:
        enc_size, stem, arch = args.img_size or DATASETS[args.dataset]["img_size"], args.stem, args.arch
        encoder, feat_dim = frozen_encoder(arch, enc_size, stem)
        masker, data_dir = None, args.data_dir or "data"
        output = args.output or os.path.join(args.output_dir or f"runs/random_{arch}", f"eval_{args.dataset}")
    if not args.output:
        output += "_augmented.json" if args.augment else ".json"
    img_size = args.img_size or enc_size
    if arch.startswith("vit") and img_size != enc_size:
        fail(f"--img_size {img_size}: a {arch} trained at {enc_size} px takes only {enc_size}-px images")
    encoder.to(device)

    # ---- data ----
    try:
        train_ds, test_ds, num_classes = build_eval_datasets(
            args.dataset, data_dir, img_size, download=args.download, seed=args.seed, num_images=args.num_images)
        if args.augment:
            aug_ds = build_eval_datasets(args.dataset, data_dir, img_size, augment=True, seed=args.seed,
                                         num_images=args.num_images)[0]
        extra_tests = build_test_folders(args.dataset, args.test_dirs or [], train_ds.classes, img_size)
    except DataError as e:
        fail(str(e))
    protocol = "augmented" if args.augment else "cached-features"
    how = "LARS η = 1e-3, as released" if args.augment else "SGD on standardised features"
    print(f"eval: {arch} ({stem} stem, built for {enc_size} px, {feat_dim} features) on {args.dataset} at "
          f"{img_size} px: {len(train_ds)} train / {len(test_ds)} test images, {num_classes} classes; "
          f"protocol {protocol} ({how}), {args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, device {device}")
    for path, dataset in extra_tests.items():
        print(f"  also testing on {path}: {len(dataset)} images")

    if args.precise_bn:                                       # README "BatchNorm state"
        seen = precise_batchnorm(encoder, train_ds, args.precise_bn, args.batch_size, args.workers, device, args.seed)
        print(f"precise BatchNorm: running statistics recomputed over {seen} clean training images")

    # ---- features (train features are needed by the cached probe and by kNN) ----
    test_feats, test_labels = extract_features(encoder, test_ds, 256, args.workers, device, "test features")
    extra_feats = {path: extract_features(encoder, dataset, 256, args.workers, device, path)
                   for path, dataset in extra_tests.items()}           # {DIR: ((n, D), (n,))}
    train_feats = train_labels = None
    if args.knn or (args.epochs > 0 and not args.augment):
        train_feats, train_labels = extract_features(encoder, train_ds, 256, args.workers, device, "train features")

    # ---- linear probe ----
    head = None
    if args.epochs > 0:
        gen = torch.Generator().manual_seed(args.seed)
        if args.augment:                                      # the released protocol
            loader = DataLoader(aug_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                generator=gen, pin_memory=device.type == "cuda",
                                persistent_workers=args.workers > 0)
            epoch_batches = lambda: augmented_batches(encoder, loader, device)   # noqa: E731
            head = train_linear_head(feat_dim, num_classes, args.epochs, args.lr, epoch_batches, device,
                                     args.bn_head, lars=True, fp16_head=device.type == "cuda")
        else:                                                 # fast: standardised cached features
            head = cached_linear_probe(train_feats, train_labels, num_classes, args.epochs, args.lr,
                                       args.batch_size, gen, args.bn_head)

    bank = (train_feats, train_labels) if args.knn else None
    main_scores = accuracies(head, bank, test_feats, test_labels, num_classes)
    if head is not None:
        print(f"linear probe: top-1 {main_scores['top1']:.2f} %"
              + (f", top-5 {main_scores['top5']:.2f} %" if main_scores["top5"] is not None else ""))
    if args.knn:
        print(f"kNN (k={KNN_K}, T={KNN_T}): top-1 {main_scores['knn_top1']:.2f} %")
    test_dirs = None
    if extra_tests:
        test_dirs = {path: dict(images=len(labels), **accuracies(head, bank, feats, labels, num_classes))
                     for path, (feats, labels) in extra_feats.items()}
        for path, result in test_dirs.items():
            print(f"{path} ({result['images']} images): " + ", ".join(
                f"{key} {value:.2f} %" for key, value in result.items() if key != "images" and value is not None))

    # ---- mask quality ----
    quality = None
    if masker is not None and args.dataset == "shapes" and args.mask_images > 0:
        quality = shapes_mask_quality(masker.to(device), args.mask_images, device, seed=args.seed)
        print(f"masks on {args.mask_images} shapes test images: ARI {quality['ari']:.3f}, "
              f"foreground ARI {quality['ari_fg']:.3f}, mIoU {quality['miou']:.3f}")

    # ---- results ----
    results = dict(dataset=args.dataset, protocol=protocol, optimizer="lars" if args.augment else "sgd",
                   img_size=img_size, arch=arch, num_classes=num_classes, train_images=len(train_ds),
                   test_images=len(test_ds), epochs=args.epochs, bn_head=args.bn_head, **main_scores,
                   knn_k=KNN_K, knn_t=KNN_T,
                   probe_losses=[round(v, 4) for v in head.epoch_losses] if head is not None else None,
                   test_dirs=test_dirs, mask_quality=quality, precise_bn=args.precise_bn, command=command,
                   checkpoint=args.ckpt,
                   epoch=ckpt.get("epoch") if ckpt is not None else None)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
