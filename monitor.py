"""What a training run shows and records besides its checkpoint: the resolved configuration at start,
one console line and one log.jsonl line per epoch, the online probe on held-out images, and a picture
of the masks. README: "Reading the outputs".
"""
import json
import os
import textwrap
import time

import torch
from torchvision.utils import make_grid, save_image

import data
from checkpoint import error_exit
from mask_quality import shapes_mask_quality
from masker import Masker


def record_epoch(model, log, args, schedules, val_loader, fixed, device, amp, evaluate=True, curves=None):
    """The end of an epoch on rank 0, after its checkpoint: add the held-out probe and (shapes) the mask
    quality to `log`, draw the masks of the `fixed` images, append `log` to log.jsonl and print its console
    line. evaluate=False (a stop): no probe, mask quality or picture; the log line says they were skipped.
    A write that fails (a full disk) ends the run in one line, exit 1, as a failed save does. curves: the
    run's Curves (--tensorboard), or None."""
    picture = os.path.join(args.output_dir, f"masks_epoch{log['epoch']:03d}.png")
    if evaluate:
        log["online_top1"] = probe_top1(model, val_loader, device, amp())
        if args.dataset == "shapes" and isinstance(model.masker, Masker):    # the true objects are known
            quality = shapes_mask_quality(model.masker, min(256, len(val_loader.dataset)), device, seed=args.seed)
            log.update({f"mask_{k}": v for k, v in quality.items()})
    else:
        log["evaluation"] = "skipped: the run stopped (its checkpoint was saved first)"
    path, drawn = picture, None
    try:
        if evaluate and model.masker is not None:
            drawn = save_mask_picture(model, fixed, picture, args)
        path = os.path.join(args.output_dir, "log.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(log) + "\n")
        if curves is not None:
            path = "its TensorBoard events"
            curves.epoch(log, drawn)
    except OSError as e:
        error_exit(f"cannot write {path} ({e.strerror or e}); the checkpoint of step {log['step']} is intact: "
                   "free some space and rerun the same command")
    print(epoch_line(log, args, schedules))


def print_config(args, device):
    """The resolved arguments, compactly, and what they imply (log.jsonl and the checkpoint hold them all)."""
    source = "the released recipe" if args.recipe else "defaults (no released run matches)"
    world, per_node = args.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    print(f"train.py: {args.dataset} · {args.method} · {args.arch} from {source}; {world // per_node} node(s) × "
          f"{per_node} process(es) on {device}; batch {args.batch_size} per process, global batch "
          f"{args.batch_size * world}; {args.precision}; output {args.output_dir}")
    flags = " ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if k not in ("recipe", "world_size"))
    print(textwrap.fill(flags.replace(", ", ","), width=110, initial_indent="  ", subsequent_indent="  "))


def epoch_line(log, args, schedules):
    """One human line per epoch: losses, slot areas, held-out probe, mask quality, speed, time left."""
    areas = "/".join(f"{log[k]:.2f}" for k in sorted(log) if k.startswith("enc_area_") and k[9:].isdigit())
    images_left = (schedules["last_step"] - log["step"]) * args.batch_size * args.world_size
    left = images_left / log["images_per_s"] if log["images_per_s"] else 0.0
    parts = [f"epoch {log['epoch'] + 1}/{args.epochs}", f"ssl {log['enc_ssl_loss']:.3f}",
             f"penalty {log['enc_penalty']:.2f}" if areas else "", f"areas {areas}" if areas else "",
             f"probe {log['online_top1']:.1f} %" if "online_top1" in log else "stopped: evaluation skipped",
             f"mask fg-ARI {log['mask_ari_fg']:.2f}" if "mask_ari_fg" in log else "",
             f"{log['images_per_s']:.0f} img/s", f"ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"]
    return "  ".join(p for p in parts if p)


@torch.no_grad()
def probe_top1(model, loader, device, autocast):
    """Top-1 (%) of the online linear probe on the held-out split (encoder in eval mode)."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast:
            logits = model.net(images.to(device), classify=True).logits
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    model.train()
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def save_mask_picture(model, images, path, args):
    """The masks of the `fixed` held-out images after an epoch, drawn by draw_masks; returns the picture."""
    info = data.dataset_info(args.dataset)
    return draw_masks(images, model.masker(images), info["mean"], info["std"], path)


@torch.no_grad()
def draw_masks(images, masks, mean, std, path):
    """A grid with one row per image: the image, its N masks, then the N masked images x ⊙ (1 − m_n).

    images: (B, 3, H, W) normalised with the dataset's mean and std (shown denormalised); masks: (B, N, H, W).
    Training's pictures (save_mask_picture) and show_masks.py draw with this one function.
    """
    masks = masks.float().cpu()
    images = images.float().cpu()
    N = masks.shape[1]
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    show = lambda x: (x * std + mean).clamp(0, 1)  # noqa: E731
    tiles = [show(images).unsqueeze(1),                                    # (B, 1, 3, H, W)
             masks.unsqueeze(2).expand(-1, -1, 3, -1, -1),                  # (B, N, 3, H, W)
             show(images.unsqueeze(1) * (1 - masks.unsqueeze(2)))]          # (B, N, 3, H, W)
    grid = torch.cat(tiles, dim=1).flatten(0, 1)                           # (B·(1+2N), 3, H, W)
    picture = make_grid(grid, nrow=1 + 2 * N, padding=1, pad_value=1.0)      # (3, H', W')
    save_image(picture, path)
    return picture


class Averager:
    """Running sums of the per-step stats dicts, kept on the device so that adding costs no host sync;
    `read` copies them to the host in one transfer (train.py: every --log_every steps and at the epoch's
    end). Per stat it also keeps the first step at which the stat was NaN or infinite."""

    def __init__(self):
        self.names, self.sums, self.first_bad, self.count = [], None, None, 0

    def add(self, stats, step):
        """stats: {name: 0-d tensor or float}, the same names every call; step: the global step reached."""
        if self.sums is not None and list(stats) != self.names:
            raise ValueError(f"stats changed their names: {list(stats)} after {self.names}")
        tensors = [v for v in stats.values() if isinstance(v, torch.Tensor)]
        device = tensors[0].device if tensors else None
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in stats.values()])
        if self.sums is None:
            self.names, self.sums = list(stats), torch.zeros_like(values)
            self.first_bad = torch.full_like(values, -1.0)                 # −1: finite so far
        self.sums += values
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(values)        # (number of stats,), on the device
        self.first_bad = torch.where(newly_bad, float(step), self.first_bad)
        self.count += 1

    def read(self):
        """(means, {name: first step it was NaN or infinite}) so far, in one device-to-host copy."""
        if self.sums is None:
            return {}, {}
        values = torch.cat([self.sums / self.count, self.first_bad]).tolist()
        k = len(self.names)
        means = dict(zip(self.names, values[:k]))
        first_bad = {name: int(s) for name, s in zip(self.names, values[k:]) if s >= 0}
        return means, first_bad

    def means(self):
        return self.read()[0]


class Curves:
    """--tensorboard: the run's numbers as TensorBoard curves in its folder, written by rank 0. At every check
    (train.py: every --log_every steps) the means since the last one, under train/ (losses, penalty, slot
    areas, the probe's batch accuracy) and lr/; at every epoch's end the held-out probe, the mask quality and
    images/s under epoch/, and the mask picture. x axis: the global step, so a resumed run continues the same
    curves: what an earlier run wrote past the checkpoint's step is dropped (purge_step), nothing is drawn
    twice."""

    def __init__(self, output_dir, start_step):
        from torch.utils.tensorboard import SummaryWriter     # only here: nothing else needs tensorboard
        self.writer = SummaryWriter(output_dir, purge_step=start_step + 1)   # the first step this run writes
        self.epoch_seen, self.totals, self.count = None, {}, 0   # the epoch's sums at its last check

    def check(self, means, count, step, epoch, lrs):
        """means: epoch `epoch`'s means over its `count` steps so far (monitor.Averager.read); lrs: {name: rate}."""
        if epoch != self.epoch_seen:                          # a new epoch: a new Averager
            self.epoch_seen, self.totals, self.count = epoch, {}, 0
        if count == self.count:                               # no step since the last check
            return
        for name, mean in means.items():
            total = mean * count
            self.writer.add_scalar(f"train/{name}", (total - self.totals.get(name, 0.0)) / (count - self.count), step)
            self.totals[name] = total
        self.count = count
        for name, rate in lrs.items():
            self.writer.add_scalar(f"lr/{name}", rate, step)

    def epoch(self, log, picture=None):
        """The epoch's record (train.py's log line) and its mask picture (3, H, W), at its last step."""
        for name in ("online_top1", "mask_ari", "mask_ari_fg", "mask_miou", "images_per_s"):
            if name in log:
                self.writer.add_scalar(f"epoch/{name}", log[name], log["step"])
        if picture is not None:
            self.writer.add_image("masks", picture, log["step"])
        self.writer.flush()

    def close(self):
        self.writer.close()
