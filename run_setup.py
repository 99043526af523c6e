"""What train.py builds from its resolved arguments before training: the processes and the device,
the autocast precision, the data, and the model (bench.py builds the same). README: "Reading guide".
"""
import datetime
import inspect
import os
import sys
import time

import torch
import torch.distributed as dist

import cli_checks
import data
import gpu_augment
from adios import ADIOS
from batchnorm import convert_to_slot_batchnorm
from encoders import build_encoder
from losses import distributed_world  # noqa: F401  (rank, world size): defined beside the gather that needs it
from masker import BlockMasker, Masker, RandomPatchMasker


def fail(message):
    cli_checks.fail("train.py", message)


def setup_distributed(device_arg, timeout_min=None):
    """(rank, world size, device) from torchrun's environment; one process when RANK is not set. RANK and
    WORLD_SIZE count every process of every machine; LOCAL_RANK picks this machine's GPU. timeout_min: how
    long a collective waits for a process that stopped answering (default torch's: 10 min NCCL, 30 gloo)."""
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(minutes=timeout_min) if timeout_min else None
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu")


def autocast_for(args, device):
    """A function returning the run's autocast context (fp32: none); resolves --precision and
    --channels_last defaults for this device first."""
    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if args.precision == "bf16" and not bf16_ok:
        fail(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --precision fp16 or fp32")
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def build_data(args, device, world, is_main):
    """(training loader of this rank's share, held-out split, number of classes), or one line and exit 2.

    No process waits alone: a --download runs on the first process of each machine that does not see rank
    0's disk (sees_rank0_files), under a barrier that waits as long as a download takes; every process
    checks its share of an image folder's files."""
    # The start's waits on slow work (a download) may last up to 3 hours, not the default 10 or 30 minutes.
    patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=3)) if world > 1 else None
    try:
        if world > 1 and args.download:
            shared = sees_rank0_files(args.data_dir, patient)
            downloader = int(os.environ.get("LOCAL_RANK", 0)) == 0 and (is_main or not shared)
            loader = build_train_loader(args, device, download=downloader) if downloader else None
            dist.barrier(group=patient)
            loader = loader or build_train_loader(args, device, download=False)
        else:
            loader = build_train_loader(args, device, download=args.download)
        _, val_set, num_classes = data.build_eval_datasets(args.dataset, args.data_dir, args.img_size,
                                                           num_images=args.num_images, seed=args.seed)
        if args.dataset in ("imagenet100", "imagefolder"):
            checked = check_images_shared(args.data_dir, world, patient)
            if is_main:
                print(f"checked {checked} images under {args.data_dir}")
    except data.DataError as e:
        fail(str(e))
    if len(loader) == 0:
        fail(f"--batch_size {args.batch_size} × {world} processes exceeds the {len(loader.sampler.dataset)} "
             "training images: lower --batch_size")
    return loader, val_set, num_classes


def check_images_shared(root, world, group):
    """Every image file under root opened once, by K processes together (data.find_bad_images' share):
    how many; the process that finds a bad one raises its DataError, the others exit 2 quietly."""
    rank = dist.get_rank() if world > 1 else 0
    problem, checked = None, 0
    try:
        checked = data.find_bad_images(root, share=(rank, world))
    except data.DataError as e:
        problem = e
    if world > 1:
        counts = torch.tensor([checked, problem is not None], dtype=torch.float64)
        dist.all_reduce(counts, group=group)
        checked, bad_somewhere = int(counts[0]), counts[1] > 0
        if bad_somewhere and problem is None:
            sys.exit(2)
    if problem is not None:
        raise problem
    return checked


def sees_rank0_files(folder, group):
    """True if this process sees the file rank 0 has just made in `folder`: the disk is shared with rank 0's
    machine (README "Many GPUs and many machines": the marker-file rule). Every process calls it."""
    os.makedirs(folder, exist_ok=True)
    name = [f".rank0-{os.getpid()}-{time.time_ns()}" if dist.get_rank() == 0 else None]
    if name[0]:
        open(os.path.join(folder, name[0]), "w").close()
    dist.broadcast_object_list(name, src=0, group=group)
    seen = os.path.exists(os.path.join(folder, name[0]))
    dist.barrier(group=group)
    if dist.get_rank() == 0:
        os.remove(os.path.join(folder, name[0]))
    return seen


def build_train_loader(args, device, download):
    """Batches ((x_a, x_b), labels) of this rank's share: PIL augmentation in CPU workers, or with
    --gpu_aug the whole uint8 split on the device, augmented there (gpu_augment.GPULoader)."""
    if not args.gpu_aug:
        train_set = data.build_pretrain_dataset(args.dataset, args.data_dir, args.img_size, download,
                                                args.jitter, args.num_images, args.seed)
        return data.build_loader(train_set, args.batch_size, args.workers, seed=args.seed)
    info = data.dataset_info(args.dataset)
    images, labels = gpu_augment.load_uint8(args.dataset, args.data_dir, args.img_size, download, args.num_images,
                                            args.seed, with_labels=True)
    augment = gpu_augment.GPUAugment(args.img_size, info["mean"], info["std"], args.jitter,
                                     info.get("crop_scale", (0.08, 1.0))).to(device)
    return gpu_augment.GPULoader(images.to(device), labels, args.batch_size, augment, seed=args.seed)


def build_model(args, num_classes, world=1, device=torch.device("cpu")):
    """ADIOS with the chosen backbone, heads and masker (or a fixed-mask baseline), on device."""
    encoder, feat_dim = build_encoder(args.arch, args.img_size, args.stem)
    if args.mask_type == "random":
        masker = RandomPatchMasker(args.img_size)
    elif args.mask_type == "block":
        masker = BlockMasker(args.img_size)
    else:
        masker = Masker(args.num_masks, args.img_size, args.mask_channels, args.mask_norm,
                        args.mask_blocks) if args.num_masks else None
    model = ADIOS(encoder, feat_dim, masker, method=args.method, alpha=args.alpha, alpha_entropy=args.alpha_entropy,
                  temperature=args.temperature, single_mask=args.single_mask, proj_hidden_dim=args.proj_hidden_dim,
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
    if world > 1:
        distribute(model, device_ids=[device.index] if device.type == "cuda" else None, sync_batchnorm=args.sync_bn)
    return model


def distribute(model, device_ids=None, sync_batchnorm=False):
    """Give ADIOS's f_θ and M_φ each their own DistributedDataParallel wrapper, in model.ddp (under torchrun).

    The encoder step differentiates through the wrapped f_θ only (masks under no_grad); the masker step
    through the wrapped M_φ only (f_θ frozen and called unwrapped), so each wrapper sees all its parameters
    used in every backward. sync_batchnorm: BatchNorm statistics over the global batch, still per slot
    (batchnorm.SlotSyncBatchNorm; gloo or NCCL).
    """
    if sync_batchnorm:
        for module in (model.net, model.target):
            if module is not None:
                convert_to_slot_batchnorm(module, sync=True)
    # No buffer broadcast before each forward: BatchNorm statistics stay per rank (or are synced by
    # SlotSyncBatchNorm). torch ≥ 2.13 names the switch forward_sync_buffers, older ones broadcast_buffers.
    DDP = torch.nn.parallel.DistributedDataParallel
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    model.ddp["net"] = DDP(model.net, device_ids=device_ids, **{quiet: False})
    if model.has_masker_step:                                 # fixed (random/block) maskers need none
        model.ddp["masker"] = DDP(model.masker, device_ids=device_ids, **{quiet: False})
    if model.target is not None:                              # start every rank's target from rank 0's
        for t in model.target.state_dict().values():
            dist.broadcast(t, 0)
