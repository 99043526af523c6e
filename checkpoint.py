"""Checkpoints of train.py: one plain dict, never half-written, checked before a run continues from it.

The dict: `model` (the whole ADIOS state), `encoder` (the backbone alone, loadable into torchvision),
`optimizers` (`encoder`, `masker`), `scaler`, `epoch` (completed epochs), `step`, `args` (every resolved
flag). README: "Reading the outputs", "When things go wrong".
"""
import os
import sys

import torch

# What a resumed run must share with the checkpoint: the model's shape, and what fixes which images a
# step trains on (the step ↔ (epoch, image) mapping that an exact mid-epoch resume relies on).
MUST_MATCH = ("arch", "num_masks", "img_size", "method", "mask_type", "mask_channels", "stem",
              "dataset", "num_images", "batch_size")


def checkpoint_state(model, opt_enc, opt_mask, scaler, epoch, step, args):
    return dict(model=model.state_dict(), encoder=model.encoder.state_dict(),
                optimizers=dict(encoder=opt_enc.state_dict(), masker=opt_mask.state_dict() if opt_mask else None),
                scaler=scaler.state_dict(), epoch=epoch, step=step, args=vars(args))


def save_checkpoint(state, path):
    """Write to a temporary file, then rename: a crash or full disk mid-save leaves the old file intact.
    A failed write stops the run (exit 1): training on without checkpoints would risk more than it gains."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())           # on disk before the rename: a power cut cannot leave an empty file
        os.replace(tmp, path)              # atomic: readers see the old checkpoint or the new, never half
    except OSError as e:
        print(f"train.py: error: cannot write {path} ({e.strerror or e}); the previous checkpoint is intact: "
              "free some space and rerun the same command", file=sys.stderr)
        sys.exit(1)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_for_resume(path, args):
    """(checkpoint, None) if `path` holds a checkpoint this run can continue, else (None, one line why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                    # truncated, not a checkpoint, unreadable
        return None, f"cannot resume: {path} cannot be read ({type(e).__name__}); delete it or restore a copy"
    if not isinstance(ckpt, dict) or not {"model", "optimizers", "epoch", "step", "args"} <= ckpt.keys():
        return None, (f"cannot resume: {path} is not a checkpoint of train.py; move it away or choose "
                      "another --output_dir")
    for key in MUST_MATCH:
        if ckpt["args"].get(key) != getattr(args, key):
            return None, (f"cannot resume: {path} was made with --{key} {ckpt['args'].get(key)}, this run has "
                          f"{getattr(args, key)}; use the same value or another --output_dir")
    if ckpt["args"].get("world_size", args.world_size) != args.world_size:     # the global batch, likewise
        return None, (f"cannot resume: {path} was made by {ckpt['args']['world_size']} processes, this run has "
                      f"{args.world_size}; use the same torchrun --nproc_per_node or another --output_dir")
    return ckpt, None
