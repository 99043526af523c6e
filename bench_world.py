"""bench.py --world K: what per-slot synchronised BatchNorm costs. Ours in K processes (gloo, each with
--batch_size images, BatchNorm per slot over all K: the torchrun path) against one process, and the
collectives of one iteration per process, ours and the released schedule's. README: "Performance".
"""
import collections
import contextlib
import os
import socket
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import released_loop
import train                 # as bench.py: the step it times is train.py's own
from batchnorm import convert_to_slot_batchnorm
from bench_setup import build_side, device_name, fail, time_block, train_args

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast")
CALLERS = {"batchnorm": "batchnorm", "losses": "simclr_negatives"}    # the file that calls → what it is


@contextlib.contextmanager
def counting_collectives():
    """Count the torch.distributed collectives called inside the block, by what calls them (CALLERS).
    DDP's gradient all-reduces are issued from C++ and are not counted."""
    counts, real = collections.Counter(), {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(fn):
        def call(*args, **kwargs):
            module = sys._getframe(1).f_globals.get("__name__")
            counts[CALLERS.get(module, "other")] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in real.items():
        setattr(dist, name, counted(fn))
    try:
        yield counts
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def world_sides(args, num_classes, world):
    """Step functions of one iteration in this process: "sync", ours as torchrun runs it; "local", the same
    with this process's own BatchNorm statistics; "released", the released schedule with synchronised
    BatchNorm (one call per slot; no DDP wrapper: it is counted, not timed)."""
    g = torch.Generator().manual_seed(dist.get_rank())         # each process its own images
    x_a, x_b = torch.randn(2, args.batch_size, 3, args.img_size, args.img_size, generator=g)
    labels = torch.randint(num_classes, (args.batch_size,), generator=g)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sides = {}
    for name in ("sync", "local", "released"):
        args.sync_bn = name == "sync"
        torch.manual_seed(0)
        processes = 1 if name == "released" else world        # 1: no DDP wrapper
        model, opt_enc, opt_mask = build_side(args, torch.device("cpu"), num_classes, processes)
        if name == "released":
            model.batch_slots = False
            for module in (model.net, model.target):
                if module is not None:
                    convert_to_slot_batchnorm(module, sync=True)
            sides[name] = lambda m=model, e=opt_enc, k=opt_mask: released_loop.iteration(m, x_a, x_b, labels, e, k)
        else:
            sides[name] = lambda m=model, e=opt_enc, k=opt_mask: train.adios_step(
                m, x_a, x_b, labels, e, k, scaler, contextlib.nullcontext)
    return sides


def world_worker(rank, a, args, port, num_classes, results):
    """One of the K processes: times "sync" and "local" interleaved, counts the collectives of each side."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=rank, world_size=a.world)
    sides = world_sides(args, num_classes, a.world)
    collectives = {}
    for name, step in sides.items():
        with counting_collectives() as counts:
            step()                                            # also the warm-up
        collectives[name] = dict(counts)
    times = {"sync": [], "local": []}
    for _ in range(a.warmup):
        sides["sync"]()
        sides["local"]()
    for _ in range(a.repeats):
        for name in times:
            dist.barrier()                                    # every process starts the block together
            times[name].append(time_block(sides[name], a.steps, torch.device("cpu"))[0])
    if rank == 0:
        results.put(dict(times=times, collectives=collectives))
    dist.destroy_process_group()


def bench_world(a, device):
    """ms per iteration of ours in one process, and in a.world processes (gloo, each with --batch_size
    images) with and without synchronised BatchNorm; the collectives of one iteration per process."""
    if device.type != "cpu":
        fail("--world times gloo processes on the CPU: add --device cpu (on GPUs, torchrun train.py shows the cost)")
    args = train_args(a, device)
    num_classes = data.dataset_info(a.dataset)["num_classes"] or 10
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.world)
    torch.set_num_threads(a.threads)
    print(f"{a.arch}, {a.method}, {args.img_size} px, batch {args.batch_size} per process, N {args.num_masks}; "
          f"{a.world} processes (gloo) vs 1, {a.threads} thread(s) each; {a.repeats} × {a.steps} steps")
    torch.manual_seed(0)
    model, opt_enc, opt_mask = build_side(args, device, num_classes)      # one process: no process group
    x_a, x_b = torch.randn(2, args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(num_classes, (args.batch_size,))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step():
        train.adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, contextlib.nullcontext)

    for _ in range(a.warmup):
        step()
    single = statistics.median(time_block(step, a.steps, device)[0] for _ in range(a.repeats))
    with socket.socket() as s:                                # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(world_worker, args=(a, args, port, num_classes, results), nprocs=a.world)
    out = results.get()
    sync, local = (statistics.median(out["times"][k]) for k in ("sync", "local"))
    result = dict(mode="world", world=a.world, threads_per_process=a.threads, device=device_name(device),
                  single_ms=round(single, 1), world_ms=round(sync, 1), world_local_bn_ms=round(local, 1),
                  sync_bn_ms=round(sync - local, 1), world_over_single=round(sync / single, 3),
                  collectives_per_iteration=dict(ours=out["collectives"]["sync"],
                                                 released=out["collectives"]["released"]),
                  config=dict(arch=a.arch, method=a.method, img_size=args.img_size, batch_size=args.batch_size,
                              num_masks=args.num_masks, steps=a.steps, warmup=a.warmup, repeats=a.repeats))
    print(f"ms / iteration: 1 process {single:.1f}; {a.world} processes {sync:.1f} with synchronised BatchNorm, "
          f"{local:.1f} without (synchronising: {sync - local:+.1f} ms, {100 * (sync - local) / local:+.1f} %)")
    for name in ("ours", "released"):
        print(f"collectives per iteration and process, {name}: {result['collectives_per_iteration'][name]} "
              "(DDP's gradient all-reduces not counted)")
    return result
