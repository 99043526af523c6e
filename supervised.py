"""supervised.py: the ceiling beside the self-supervised rows, the same encoder trained on the labels.

    python supervised.py                                  # shapes: the CPU demo's encoder, views and budget
    python eval_linear.py --ckpt runs/shapes_supervised_resnet18/checkpoint.pth --dataset shapes --knn

It takes train.py's flags and defaults, so a run here and `python train.py` with the same flags share the
encoder (--arch, --img_size, --stem), the images and their two views per image, the epochs (and
--max_steps), the batch, the warmup-cosine schedule and the seed. What differs: cross-entropy of a linear
head on both views' features instead of the self-supervised loss, no masks, and AdamW instead of LARS. It writes
checkpoint.pth with the `encoder` and `args` keys eval_linear.py reads, so the ceiling is scored by the
same frozen-feature probe and kNN as every other row (README, "Evidence on shapes").
"""
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli_checks
import data
import optim
import recipes
from checkpoint import save_checkpoint
from cli_checks import output_dir_problem, train_args_problem
from encoders import build_encoder
from run_setup import build_train_loader


# A standard supervised recipe (AdamW, weight decay 0.05) on the demo's warmup-cosine schedule: LARS at the
# self-supervised rate overshoots on a cross-entropy head. --lr and --weight_decay still override.
SUPERVISED = dict(lr=1e-3, weight_decay=0.05)


def parse_args(argv):
    """train.py's flags, resolved as there; the default folder is runs/<dataset>_supervised_<arch>[_seedK]."""
    args = recipes.get_args_parser().parse_args(argv)
    named = args.output_dir is not None
    if "optimizer" in vars(args):
        fail("--optimizer: supervised.py always trains with AdamW (the flag is train.py's); drop it")
    for key, value in {**SUPERVISED, "optimizer": "adamw"}.items():      # unless given
        vars(args).setdefault(key, value)
    args = recipes.resolve_args(args)
    if problem := train_args_problem(args):
        fail(problem)
    if not named:
        args.output_dir = os.path.join("runs", f"{args.dataset}_supervised_{args.arch}"
                                       + (f"_seed{args.seed}" if args.seed else ""))
    args.method, args.num_masks = "supervised", 0        # what the checkpoint's args say it is
    if problem := output_dir_problem(args.output_dir):
        fail(problem)
    return args


def fail(message):
    """Bad input: one line on stderr, exit code 2, before any work starts."""
    cli_checks.fail("supervised.py", message)


@torch.no_grad()
def held_out_top1(encoder, head, loader, device):
    """Top-1 (%) of encoder + head on the held-out split, encoder in eval mode."""
    encoder.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (head(encoder(images.to(device))).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    encoder.train()
    return 100.0 * correct / max(total, 1)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log_path = os.path.join(args.output_dir, "log.jsonl")
    open(log_path, "w").close()                           # a new run: no resume here
    try:
        loader = build_train_loader(args, device, download=args.download)            # ((x_a, x_b), labels)
        _, val_set, num_classes = data.build_eval_datasets(args.dataset, args.data_dir, args.img_size,
                                                           num_images=args.num_images, seed=args.seed)
    except data.DataError as e:
        fail(str(e))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=min(args.workers, 2))

    torch.manual_seed(args.seed)
    encoder, feat_dim = build_encoder(args.arch, args.img_size, args.stem)
    head = nn.Linear(feat_dim, num_classes)
    encoder.to(device), head.to(device)
    groups = optim.param_groups(encoder, args.lr, args.weight_decay) + \
        optim.param_groups(head, args.lr, args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr)
    schedule = optim.learning_rate_schedules(args, len(loader))
    print(f"supervised.py: {args.dataset} · {args.arch} ({args.stem} stem) at {args.img_size} px, {args.epochs} "
          f"epochs, batch {args.batch_size}, {args.optimizer} lr {args.lr}; output {args.output_dir}")

    step, start = 0, time.time()
    for epoch in range(args.epochs):
        if step >= schedule["last_step"]:                          # --max_steps
            break
        loader.sampler.set_epoch(epoch)
        total_loss, first = torch.zeros((), device=device), step
        for (x_a, x_b), labels in tqdm(loader, desc=f"epoch {epoch}", leave=False):
            if step >= schedule["last_step"]:
                break
            optim.set_learning_rates(opt, step, **schedule["encoder"])
            x = torch.cat([x_a, x_b]).to(device)                   # (2B, 3, H, W): both views, as pretraining
            y = labels.to(device).repeat(2)                         # (2B,)
            loss = F.cross_entropy(head(encoder(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.detach()
            step += 1
        top1 = held_out_top1(encoder, head, val_loader, device)
        log = dict(epoch=epoch, step=step, loss=total_loss.item() / (step - first), test_top1=top1,
                   seconds=round(time.time() - start, 1))
        with open(log_path, "a") as f:
            f.write(json.dumps(log) + "\n")
        print(f"epoch {epoch + 1}/{args.epochs}  loss {log['loss']:.3f}  held-out top-1 {top1:.1f} %  "
              f"{log['seconds']:.0f} s")
    save_checkpoint(dict(encoder=encoder.state_dict(), head=head.state_dict(), epoch=log["epoch"] + 1, step=step,
                         args=vars(args)), os.path.join(args.output_dir, "checkpoint.pth"))
    print(f"wrote {os.path.join(args.output_dir, 'checkpoint.pth')}")
    return log


if __name__ == "__main__":
    main()
