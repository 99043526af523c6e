"""Time one ADIOS iteration of this implementation against the released schedule, or the input pipeline.

    python bench.py                          # GPU: the STL10 SimCLR recipe (ResNet18, 96 px, batch 256, N 6, c 128)
    python bench.py --device cpu             # CPU: ResNet18 (standard stem) at 32 px, batch 64, N 4, c 16, ~1 min
    python bench.py --device cpu --threads 1 # the same on a CPU shared with other work (see --threads)
    python bench.py --method byol --precision fp32 --steps 5      # any recipe flag of train.py's kind
    python bench.py --loader                 # the input pipeline alone: CPU workers vs GPUAugment
    python bench.py --device cpu --world 2   # what per-slot synchronised BatchNorm costs: 2 processes (gloo) vs 1
    python bench.py --syncs                  # host synchronisations per iteration of train.py's loop

One iteration = the encoder step + the masker step (Sec. 2). "ours" is train.adios_step exactly as
train.py runs it (clean view encoded once per step, the N masked views as one batch with per-slot
BatchNorm statistics, autocast, channels_last on CUDA); "released" is released_loop.iteration, the authors'
schedule on the same modules with the same losses: fp32, one call per slot, the clean view encoded again
for every slot in both steps (README: "Performance"). The two run in the same
process, interleaved, after warm-up; the table gives medians over repeats, the last line one JSON object.
Inputs are random tensors: the input pipeline is timed on its own by --loader. --world K times ours in
K processes (gloo; each with --batch_size images, BatchNorm per slot over all K: the torchrun path)
against one, and counts the collectives of one iteration. --syncs runs train.py's loop
(train.train_one_epoch) on device-resident batches and counts the times the host waits for the
device, per iteration: on CUDA with torch's sync debug mode, on the CPU the Python reads of tensor
values. README: "Performance".
"""
import argparse
import contextlib
import json
import os
import statistics
import time
import warnings

import torch

import bench_world
import cli_checks
import data
import gpu_augment
import optim
import recipes
import released_loop
import train                 # the one entry point a library imports: bench.py times train.py's own step
from adios import METHODS
from bench_setup import build_pair, build_side, count_flops, device_name, fail, sync, time_block, train_args
from encoders import ARCHS, STEMS


# The shapes configuration the CPU figures of README ("Performance") were measured on, pinned here rather
# than read from train.py's demo defaults, so a change of the demo does not change what bench.py times.
CPU_GROUND = dict(img_size=32, stem="standard", batch_size=64, num_masks=4, mask_channels=16)


def get_args_parser():
    p = cli_checks.Parser("bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run (unset flags: train.py's recipe for --dataset, as train.py would)")
    g.add_argument("--dataset", default=None, help="picks the recipe and --loader's data (default: stl10 on "
                   "CUDA, shapes on CPU; --loader falls back to shapes when the files are absent)")
    g.add_argument("--data_dir", default="./data", help="where the dataset lives (--loader)")
    g.add_argument("--arch", default="resnet18", choices=ARCHS)
    g.add_argument("--stem", default=None, choices=STEMS, help="ResNet stem (as train.py)")
    g.add_argument("--method", default="simclr", choices=METHODS)
    g.add_argument("--img_size", type=int, default=None, help="image size (default: the dataset's)")
    g.add_argument("--batch_size", type=int, default=None, help="images per iteration")
    g.add_argument("--num_masks", type=int, default=None, help="N, slots per image (≥ 2)")
    g.add_argument("--mask_channels", type=int, default=None, help="c, the U-Net base width")
    g.add_argument("--proj_hidden_dim", type=int, default=None)
    g.add_argument("--proj_output_dim", type=int, default=None)
    g.add_argument("--pred_hidden_dim", type=int, default=None)
    g = p.add_argument_group("system (these apply to ours; the released side is always fp32, NCHW, eager)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="ours' autocast dtype (default: bf16 on GPUs that have it, else fp32)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="ours' memory format (default: on for CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile ours' encoder and masker (raise --warmup)")
    g.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: os.cpu_count(); "
                   "on a machine shared with other work, 1 avoids OpenMP threads waiting on each other)")
    g = p.add_argument_group("timing")
    g.add_argument("--steps", type=int, default=None, help="iterations per timed block (default: 10 CUDA, 2 CPU)")
    g.add_argument("--warmup", type=int, default=None, help="untimed iterations of each side first (default: 3 / 1)")
    g.add_argument("--repeats", type=int, default=None, help="timed blocks per side, interleaved; the median "
                   "is reported (default: 5 / 3)")
    g = p.add_argument_group("--loader: the input pipeline alone")
    g.add_argument("--loader", action="store_true", help="time two-view batches from CPU workers and GPUAugment")
    g.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker counts to try (default: 0 2 4 8 up to os.cpu_count(), and train.py's default)")
    g.add_argument("--batches", type=int, default=10, help="timed batches per setting (at least 4 per worker)")
    g.add_argument("--num_images", type=int, default=None, help="images for GPUAugment's uint8 tensor "
                   "(default: all; 1024 for shapes, which is generated)")
    g = p.add_argument_group("--syncs: host synchronisations of train.py's loop")
    g.add_argument("--syncs", action="store_true", help="count them per iteration over --steps iterations "
                   "(default 2 × --log_every + 1)")
    g.add_argument("--log_every", type=int, default=None, help="train.py's --log_every (default: as train.py, 20 on "
                   "CUDA, 1 on the CPU)")
    g = p.add_argument_group("--world: the cost of synchronised BatchNorm (CPU)")
    g.add_argument("--world", type=int, default=None, help="K processes (gloo), each with --batch_size images and "
                   "--threads threads (default: the cores divided by K), against one process")
    return p


def bench_iteration(a, device):
    args = train_args(a, device)
    torch.manual_seed(0)
    num_classes = data.dataset_info(a.dataset)["num_classes"] or 10
    (model, opt_enc, opt_mask), (ref, ref_enc, ref_mask) = build_pair(args, device, num_classes)
    B, S = args.batch_size, args.img_size
    x_a, x_b = torch.randn(2, B, 3, S, S, device=device)      # 2 × (B, 3, S, S)
    labels = torch.randint(num_classes, (B,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731

    def ours():
        train.adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, amp)
        if model.method == "byol":
            model.momentum_update(0.99)

    def released():
        released_loop.iteration(ref, x_a, x_b, labels, ref_enc, ref_mask)
        if ref.method == "byol":
            ref.momentum_update(0.99)

    print(f"{a.arch} ({args.stem} stem), {a.method}, {S} px, batch {B}, N {args.num_masks}, c {args.mask_channels}, "
          f"heads {args.proj_hidden_dim}/{args.proj_output_dim}, ours {args.precision}"
          f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
          f"{device_name(device)}; warmup {a.warmup}, {a.repeats} × {a.steps} steps per side")
    for side in (ours, released):
        for _ in range(a.warmup):
            side()
    times, peaks = {"ours": [], "released": []}, {"ours": [], "released": []}
    for _ in range(a.repeats):                                # interleaved: drifts hit both sides alike
        for name, side in (("ours", ours), ("released", released)):
            ms, peak = time_block(side, a.steps, device)
            times[name].append(ms)
            peaks[name].append(peak)
    flops = {"ours": count_flops(ours), "released": count_flops(released)}

    result = dict(device=device_name(device))
    for name in ("ours", "released"):
        ms = statistics.median(times[name])
        result[f"{name}_ms"] = round(ms, 2)
        result[f"{name}_images_per_s"] = round(B * 1000 / ms, 1)
        result[f"{name}_peak_mib"] = round(max(peaks[name])) if device.type == "cuda" else None
        result[f"{name}_gflop"] = round(flops[name] / 1e9, 2) if flops[name] else None
        result[f"{name}_tflops"] = round(flops[name] / ms / 1e9, 3) if flops[name] else None
    result["speedup"] = round(result["released_ms"] / result["ours_ms"], 3)
    result["config"] = dict(arch=a.arch, stem=args.stem, method=a.method, img_size=S, batch_size=B,
                            num_masks=args.num_masks, mask_channels=args.mask_channels,
                            proj_hidden_dim=args.proj_hidden_dim, proj_output_dim=args.proj_output_dim,
                            precision=args.precision, channels_last=args.channels_last, compile=args.compile,
                            steps=a.steps, warmup=a.warmup, repeats=a.repeats)

    na = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    rows = [("ms / iteration (median)", "_ms", ".1f"), ("images / s", "_images_per_s", ".1f"),
            ("peak memory (MiB)", "_peak_mib", "d"), ("GFLOP / iteration", "_gflop", ".1f"),
            ("achieved TFLOP/s", "_tflops", ".3f")]
    print(f"{'':26}{'ours':>12}{'released':>12}")
    for label, key, fmt in rows:
        print(f"{label:26}{na(result['ours' + key], fmt):>12}{na(result['released' + key], fmt):>12}")
    print(f"{'speedup (released / ours)':26}{result['speedup']:>11.2f}×")
    return result


# ---- the input pipeline (--loader) -------------------------------------------------------------------

def loader_rate(loader_iter, warm, timed, batch_size):
    """Images/s of two-view batches from an iterator, after `warm` untimed batches."""
    for _ in range(warm):
        next(loader_iter)
    start = time.perf_counter()
    for _ in range(timed):
        next(loader_iter)
    return timed * batch_size / (time.perf_counter() - start)


def bench_loader(a, device):
    name, size = a.dataset, a.img_size or data.dataset_info(a.dataset)["img_size"]
    B = a.batch_size or (256 if device.type == "cuda" else 64)
    workers = a.workers or sorted({0, recipes.default_workers(device.type)} | {w for w in (2, 4, 8) if w <= (os.cpu_count() or 1)})
    rounds = {w: (max(1, w), max(a.batches, 4 * w)) for w in workers}    # warm: every worker's first batch
    try:
        dataset = data.build_pretrain_dataset(name, a.data_dir, size)
    except data.DataError as e:
        print(f"{e}\n→ timing the shapes dataset at {size} px instead")
        name = "shapes"
    if name == "shapes":                                      # generated on the fly: make just enough
        needed = max(warm + timed + 1 for warm, timed in rounds.values()) * B
        dataset = data.build_pretrain_dataset(name, a.data_dir, size, num_images=needed)
    info = data.dataset_info(name)
    print(f"input pipeline: {name} at {size} px, batch {B} (two views each), {device_name(device)}")
    result = dict(mode="loader", dataset=name, img_size=size, batch_size=B, device=device_name(device),
                  cpu_workers={})
    for w, (warm, timed) in rounds.items():                   # CPU workers: PIL transforms per image
        loader = data.build_loader(dataset, B, w)
        it = iter(loader)
        rate = loader_rate(it, warm, min(timed, len(loader) - warm), B)
        del it, loader                                        # stops the workers
        result["cpu_workers"][str(w)] = round(rate, 1)
        print(f"  CPU workers = {w:<3}{rate:12.1f} images/s")
    del dataset

    num = a.num_images or (1024 if name == "shapes" else None)
    try:
        images = gpu_augment.load_uint8(name, a.data_dir, size, num_images=num).to(device)   # (M, 3, H, W) uint8
    except data.DataError as e:                               # image folders: no uint8 tensor
        print(f"  GPUAugment: {e}")
        result["gpu_augment"] = None
        return result
    augment = gpu_augment.GPUAugment(size, info["mean"], info["std"]).to(device)

    def two_views():
        x = images[torch.randint(len(images), (B,), device=device)]                # (B, 3, H, W)
        return augment(x), augment(x)                          # 2 × (B, 3, size, size)

    two_views()
    sync(device)
    start = time.perf_counter()
    for _ in range(a.batches):
        two_views()
    sync(device)
    result["gpu_augment"] = round(a.batches * B / (time.perf_counter() - start), 1)
    print(f"  GPUAugment on {device.type:<5}{result['gpu_augment']:12.1f} images/s   (compare: images/s of "
          "`python bench.py`, the training iteration)")
    return result


# ---- --syncs: where the host waits for the device ------------------------------------------------

TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@contextlib.contextmanager
def counting_syncs(device):
    """A function giving the host synchronisations inside the block so far: CUDA's sync debug mode's
    warnings, or on the CPU the Python reads of a tensor's value (what would wait for a GPU)."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield lambda: sum("synchroniz" in str(w.message) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    seen, real = [], {name: getattr(torch.Tensor, name) for name in TENSOR_READS}
    for name, fn in real.items():
        setattr(torch.Tensor, name, lambda self, *args, _fn=fn, **kwargs: seen.append(1) or _fn(self, *args, **kwargs))
    try:
        yield lambda: len(seen)
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)


def bench_syncs(a, device):
    """Host synchronisations per iteration of train.train_one_epoch, on random batches already on the
    device (no loader): between checks, and at each check (every --log_every steps and at the end)."""
    args = train_args(a, device)
    torch.manual_seed(0)
    num_classes = data.dataset_info(a.dataset)["num_classes"] or 10
    model, opt_enc, opt_mask = build_side(args, device, num_classes)
    args.log_every = train.check_every(args, device)
    steps = a.steps if a.steps_given else 2 * args.log_every + 1
    B, S = args.batch_size, args.img_size
    batch = ((torch.randn(B, 3, S, S, device=device), torch.randn(B, 3, S, S, device=device)),
             torch.randint(num_classes, (B,), device=device))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    args.max_steps, args.epochs = None, 1
    schedules = optim.learning_rate_schedules(args, steps)
    epoch = lambda loader: train.train_one_epoch(model, loader, opt_enc, opt_mask, scaler, amp, 0, 0,  # noqa: E731
                                                 schedules, args, device, {"signal": None})
    epoch([batch] * 2)                                        # warm-up: kernels chosen, memory allocated
    sync(device)
    marks, real_step = [], train.adios_step
    with counting_syncs(device) as syncs:
        train.adios_step = lambda *step_args: marks.append(syncs()) or real_step(*step_args)
        try:
            epoch([batch] * steps)
        finally:
            train.adios_step = real_step
        marks.append(syncs())
    per_iteration = [b - a for a, b in zip(marks, marks[1:])]               # iteration i: step i+1 and after
    checks = [i for i in range(steps) if (i + 1) % args.log_every == 0 or i == steps - 1]
    between = [n for i, n in enumerate(per_iteration) if i not in checks]
    result = dict(mode="syncs", device=device_name(device), precision=args.precision, steps=steps,
                  log_every=args.log_every, per_iteration=per_iteration,
                  between_checks=round(statistics.mean(between), 3) if between else None,
                  at_checks=round(statistics.mean(per_iteration[i] for i in checks), 3),
                  config=dict(arch=a.arch, method=a.method, img_size=S, batch_size=B, num_masks=args.num_masks))
    print(f"host synchronisations per iteration of train.py's loop ({a.method}, {args.precision}, "
          f"{device_name(device)}): {result['between_checks']} between checks, {result['at_checks']} at a check "
          f"(every {args.log_every} steps and at the epoch's end); per iteration: {per_iteration}")
    return result


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None):
    a = get_args_parser().parse_args(argv)
    if problem := cli_checks.device_problem(a.device):
        fail(problem)
    if problem := cli_checks.below_minimum(a, dict(steps=1, repeats=1, threads=1, warmup=0, batches=1, num_images=1,
                                                   world=2, log_every=1)):
        fail(problem)
    return run(a)


def run(a):
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads or os.cpu_count() or 1)
    a.dataset = a.dataset or ("stl10" if cuda else "shapes")
    if a.dataset == "shapes":           # one ground for every before/after figure, whatever the demo's defaults
        for key, value in CPU_GROUND.items():
            setattr(a, key, value if getattr(a, key) is None else getattr(a, key))
    a.steps_given = a.steps is not None
    a.steps = a.steps or (10 if cuda else 2)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    a.repeats = a.repeats or (5 if cuda else 3)
    result = bench_loader(a, device) if a.loader else bench_world.bench_world(a, device) if a.world else \
        bench_syncs(a, device) if a.syncs else bench_iteration(a, device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
