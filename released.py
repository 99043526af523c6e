"""The authors' released checkpoints → this repo's modules: `load_released(path) -> (model, args)`.

The authors released their trained ADIOS models as zips that unpack to `<run name>/<run id>/`, holding
`args.json` (every flag of the run, under the released argparse names) and one PyTorch Lightning `.ckpt`.
`load_released` rebuilds that run as the `adios.ADIOS` train.py builds (run_setup.build_model, from the
train.py arguments `released_train_args` derives from args.json) and loads every tensor of the
checkpoint's `state_dict` into it, each renamed once (`our_name`); anything that does not fit is refused
in one line naming it. Nothing of the authors' stack is needed (no Lightning, no timm) and no pickled
code runs: `torch.load(weights_only=True)`, with Lightning's class-keyed callback entries read as inert
stand-ins and dropped. README: "The authors' models"; docs/released.md has the details.
"""
import json
import math
import os
import re

import torch

import recipes
from encoders import ARCHS
from run_setup import build_model

RELEASED_METHODS = {              # released --method → (our --method, ADIOS-s)
    "simclr_adios": ("simclr", False), "simclr_adios_s": ("simclr", True),
    "byol_adios": ("byol", False), "byol_adios_s": ("byol", True),
    "simsiam_adios": ("simsiam", False), "simsiam_adios_s": ("simsiam", True),
}
RELEASED_DATASETS = {"imagenet100s": "imagenet100", "imagenet100": "imagenet100", "stl10": "stl10"}
UNET_NORMS = {"gn": "gn", "in": "in", "no": "none"}


class ReleasedError(ValueError):
    """A released run that cannot be loaded; the message is one line naming the file or key."""


# ---- where the files are --------------------------------------------------------------------------

def is_released_path(path):
    """True for what load_released takes (a run folder, or a Lightning .ckpt); train.py writes .pth files."""
    return os.path.isdir(path) or path.endswith(".ckpt")


def run_files(path):
    """(the .ckpt, its args.json) for a run folder (or the folder above it, as a zip unpacks) or a .ckpt."""
    if not os.path.exists(path):
        raise ReleasedError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        args_path = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")
        if not os.path.isfile(args_path):
            raise ReleasedError(f"{path}: no args.json beside it; keep the .ckpt in its unpacked run folder")
        return path, args_path
    folder = path
    inside = [os.path.join(path, d) for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
    if not os.path.isfile(os.path.join(path, "args.json")) and len(inside) == 1:
        folder = inside[0]                                    # <run name>/ holding one <run id>/
    ckpts = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt"))
    if not os.path.isfile(os.path.join(folder, "args.json")) or len(ckpts) != 1:
        raise ReleasedError(f"{path}: a released run folder holds args.json and one .ckpt; found "
                            f"{'args.json' if os.path.isfile(os.path.join(folder, 'args.json')) else 'no args.json'}"
                            f" and {len(ckpts)} .ckpt file(s) in {folder}")
    return os.path.join(folder, ckpts[0]), os.path.join(folder, "args.json")


# ---- safe reading of a Lightning checkpoint --------------------------------------------------------

class StandIn:
    """What a global the safe loader does not know (e.g. a Lightning callback class keying its state)
    becomes: an inert class of ours, never the named code, which is never imported."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def read_checkpoint(path):
    """The checkpoint dict, loaded with weights_only=True; unknown globals become StandIn subclasses
    (torch ≥ 2.6: get_unsafe_globals_in_checkpoint, safe_globals with (object, name) pairs)."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(type(name.rsplit(".", 1)[-1], (StandIn,), {}), name) for name in unknown]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                    # not a zip, truncated, unreadable
        raise ReleasedError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]})") from None


def lightning_state_dict(ckpt, path):
    """The `state_dict` of a released Lightning checkpoint (tensors only); a one-line refusal otherwise."""
    if isinstance(ckpt, dict) and {"model", "args"} <= ckpt.keys():
        raise ReleasedError(f"{path} is a checkpoint of train.py, not a released one: give it to --ckpt "
                            "as a .pth file")
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt):
        raise ReleasedError(f"{path} is neither a released ADIOS checkpoint (a Lightning dict with "
                            "state_dict) nor one of train.py")
    state = ckpt["state_dict"]
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ReleasedError(f"{path}: state_dict entry {key} is a {type(value).__name__}, not a tensor")
    return state


# ---- args.json → train.py's arguments ------------------------------------------------------------

def need(released, key):
    if key not in released:
        raise ReleasedError(f"args.json has no {key!r}, which the architecture needs")
    return released[key]


def released_train_args(released, run_dir):
    """train.py's resolved arguments for the released run described by args.json (a dict).

    What shapes the model comes from args.json (refused in one line if missing or not buildable here);
    the recipe's rates, jitter and SimSiam terms too where args.json has them, the rest from train.py's
    recipe tables (recipes.py:recipe_for) and defaults. The authors' paths (data_dir, checkpoint_dir,
    wandb_dir) are never taken: --data_dir keeps train.py's default, --output_dir is the run folder.
    """
    method, dataset, arch = need(released, "method"), need(released, "dataset"), need(released, "encoder")
    if method not in RELEASED_METHODS:
        raise ReleasedError(f"args.json 'method' {method!r} is not one of the released ADIOS methods "
                            f"({', '.join(RELEASED_METHODS)})")
    if dataset not in RELEASED_DATASETS:
        raise ReleasedError(f"args.json 'dataset' {dataset!r}: this repo takes {', '.join(RELEASED_DATASETS)}")
    if arch not in ARCHS:
        raise ReleasedError(f"args.json 'encoder' {arch!r}: this repo builds {', '.join(ARCHS)}")
    if released.get("cifar"):
        raise ReleasedError("args.json 'cifar' is true: the released CIFAR ResNet stem pads its 3×3 conv by 2, "
                            "train.py's by 1, so its features would differ")
    unet_norm = need(released, "unet_norm")
    if unet_norm not in UNET_NORMS:
        raise ReleasedError(f"args.json 'unet_norm' {unet_norm!r} is none of {', '.join(UNET_NORMS)}")
    base, single = RELEASED_METHODS[method]
    img_size = int(need(released, "img_size"))
    # The model, exactly. U-Net depth: SimSiam names it; the others take int(log2(img_size) − 1), as released.
    ours = dict(num_masks=int(need(released, "N")), mask_channels=int(need(released, "mask_fbase")),
                mask_norm=UNET_NORMS[unet_norm], proj_hidden_dim=int(need(released, "proj_hidden_dim")),
                proj_output_dim=int(need(released, "output_dim")), single_mask=single,
                mask_blocks=int(need(released, "num_blocks")) if base == "simsiam" else int(math.log2(img_size) - 1))
    if base != "simclr":
        ours["pred_hidden_dim"] = int(need(released, "pred_hidden_dim"))
    if arch.startswith("resnet"):
        ours["stem"] = "standard"                             # ImageNet's stem at every size (cifar is false)
    # The recipe, where args.json has it.
    renamed = dict(lr=("lr", float), mask_lr=("mask_lr", float), weight_decay=("weight_decay", float),
                   batch_size=("batch_size", int), max_epochs=("epochs", int), alpha_sparsity=("alpha", float),
                   alpha_entropy=("alpha_entropy", float), temperature=("temperature", float),
                   warmup_epochs=("warmup_epochs", int), train_mask_epoch=("encoder_early_end", int))
    for theirs, (flag, kind) in renamed.items():
        if released.get(theirs) is not None:
            ours[flag] = kind(released[theirs])
    jitter = [released.get(k) for k in ("brightness", "contrast", "saturation", "hue")]
    if all(isinstance(j, list) and j for j in jitter):
        ours["jitter"] = [float(j[0]) for j in jitter]
    if base == "simsiam":                                     # the released SimSiam terms, by their names here
        for theirs, flag in (("use_no_mask", "simsiam_unmasked"), ("use_symmetry_mask", "simsiam_masked_targets"),
                             ("use_both_mask", "simsiam_both_masked")):
            if theirs in released:
                ours[flag] = bool(released[theirs])
    # train.py's parser picks the recipe; the values above win over it, as flags given on a command line do.
    args = recipes.get_args_parser().parse_args(["--dataset", RELEASED_DATASETS[dataset], "--method", base,
                                               "--arch", arch, "--output_dir", run_dir])
    vars(args).update(ours, img_size=img_size)
    args = recipes.resolve_args(args)
    if problem := recipes.train_args_problem(args):
        raise ReleasedError(f"args.json describes a model this repo cannot build: {problem}")
    return args


# ---- the released names → ours ---------------------------------------------------------------------

# timm's VisionTransformer (vit_tiny_patch16_224, num_classes=0) → torchvision's VisionTransformer.
# timm's fused qkv Linear stacks q, k, v row-wise, head after head within each, as torchvision's
# in_proj_weight does: the tensors are copied as they are.
VIT_NAMES = [
    (r"cls_token", "class_token"),
    (r"pos_embed", "encoder.pos_embedding"),
    (r"patch_embed\.proj\.(\w+)", r"conv_proj.\1"),
    (r"norm\.(\w+)", r"encoder.ln.\1"),
    (r"blocks\.(\d+)\.norm1\.(\w+)", r"encoder.layers.encoder_layer_\1.ln_1.\2"),
    (r"blocks\.(\d+)\.norm2\.(\w+)", r"encoder.layers.encoder_layer_\1.ln_2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_weight"),
    (r"blocks\.(\d+)\.attn\.qkv\.bias", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_bias"),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.layers.encoder_layer_\1.self_attention.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(\w+)", r"encoder.layers.encoder_layer_\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(\w+)", r"encoder.layers.encoder_layer_\1.mlp.3.\2"),
]
# The released U-Net: the same blocks as masker.Masker; its bottleneck MLP starts with a Flatten module,
# so its Linear layers sit at 1, 3, 5 (ours: 0, 2, 4); its 1×1 head is the separate `mask_head.0`.
UNET_NAMES = [
    (r"mask_encoder\.(down|up)\.(.+)", r"masker.\1.\2"),
    (r"mask_encoder\.mlp\.([135])\.(\w+)", lambda m: f"masker.mlp.{int(m[1]) - 1}.{m[2]}"),
    (r"mask_head\.0\.(\w+)", r"masker.head.\1"),
]
MODULES = {"encoder": "net.encoder", "momentum_encoder": "target.encoder", "projector": "net.projector",
           "momentum_projector": "target.projector", "predictor": "net.predictor", "classifier": "net.classifier"}


def rename(name, table):
    """The name the first fully matching pattern of table gives, or None."""
    for pattern, replacement in table:
        if re.fullmatch(pattern, name):
            return re.sub(f"^{pattern}$", replacement, name)
    return None


def our_name(key, arch):
    """This repo's state_dict name for a released state_dict key, or None if it has none."""
    if key.startswith(("mask_encoder.", "mask_head.")):
        return rename(key, UNET_NAMES)
    module, _, rest = key.partition(".")
    if module not in MODULES:
        return None
    if module in ("encoder", "momentum_encoder") and arch.startswith("vit"):
        rest = rename(rest, VIT_NAMES)
        if rest is None:
            return None
    return f"{MODULES[module]}.{rest}"


def convert_state_dict(theirs, model, arch, method):
    """Our full state_dict from the released one; every key is used, or ReleasedError names it.

    SimSiam: the released projector's last Linear (`projector.6`) has a bias, ours none. It is followed by
    BatchNorm1d(affine=False), which removes it in train mode and in eval mode subtracts the running mean
    after it: BN(Wx + b) = (Wx − (μ − b)) / σ. So b is folded into the running mean, μ ← μ − b.
    """
    ours, expected = {}, model.state_dict()
    for key, value in theirs.items():
        if method == "simsiam" and key == "projector.6.bias":
            continue                                          # folded below
        name = our_name(key, arch)
        if name is None or name not in expected:
            raise ReleasedError(f"state_dict key {key} has no place in this repo's {method} {arch} model")
        if value.shape != expected[name].shape:
            raise ReleasedError(f"state_dict key {key} has shape {tuple(value.shape)}, this repo's {name} "
                                f"{tuple(expected[name].shape)}: args.json and the checkpoint disagree")
        ours[name] = value
    if method == "simsiam" and "projector.6.bias" in theirs and "net.projector.7.running_mean" in ours:
        bias = theirs["projector.6.bias"]
        ours["net.projector.7.running_mean"] = ours["net.projector.7.running_mean"] - bias.to(
            ours["net.projector.7.running_mean"].dtype)
    missing = [name for name in expected if name not in ours]
    if missing:
        raise ReleasedError(f"the checkpoint has no tensor for {missing[0]} ({len(missing)} missing): "
                            "is args.json the one of this checkpoint?")
    return ours


# ---- the whole seam --------------------------------------------------------------------------------

def load_released(path):
    """(model, args) for a released run: `path` is its unpacked folder, or its .ckpt beside args.json.

    model: the adios.ADIOS train.py builds for that run (model.net.encoder, model.masker, model.target
    for BYOL from the released momentum_* tensors), every tensor loaded, in eval mode on the CPU.
    args: train.py's arguments of that run (released_train_args). Raises ReleasedError (one line).
    """
    ckpt_path, args_path = run_files(path)
    try:
        with open(args_path) as f:
            released = json.load(f)
    except (OSError, ValueError) as e:
        raise ReleasedError(f"{args_path} cannot be read as JSON ({type(e).__name__})") from None
    state = lightning_state_dict(read_checkpoint(ckpt_path), ckpt_path)
    if not isinstance(released, dict):
        raise ReleasedError(f"{args_path} is not a dict of arguments")
    args = released_train_args(released, os.path.dirname(os.path.abspath(ckpt_path)))
    num_classes = int(need(released, "n_classes"))
    model = build_model(args, num_classes)
    model.load_state_dict(convert_state_dict(state, model, args.arch, args.method))
    return model.eval(), args
