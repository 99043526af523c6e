"""The masks ADIOS learned, on any photos: the paper's qualitative figure (Fig. 1) from a checkpoint.

    python show_masks.py --ckpt runs/shapes_simclr_resnet18/checkpoint.pth photo.jpg photos/
    python show_masks.py --ckpt simclr_adios_imagenet100s --released_view photos/   # an authors' model

--ckpt takes a checkpoint of train.py (.pth) or one of the authors' released runs (its unpacked folder or
its .ckpt: released.py). Each image is shown as the model sees it, then its N masks, then the N masked
images, one row per image (the layout of training's mask pictures, monitor.py:draw_masks), in
DIR/masks.png; DIR/masks.pt holds {"images": (B, 3, H, W) the normalised inputs, "masks": (B, N, H, W)
the soft masks}. Default DIR: masks/ beside the checkpoint (inside a released run folder).

The view: by default the whole photo at the model's size (EXIF orientation applied, any mode made RGB,
the short side resized to the model's size, the centre square kept). --released_view: the test view of
the model's dataset instead (ImageNet100-S at 96 px: the central 96 × 96 of a 256-px resize, about 14 %
of the photo). Runs on a CPU in seconds. README: "The authors' models".
"""
import os

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import cli_checks
import data
import released
from cli_checks import Parser
from checkpoint import learned_masker
from monitor import draw_masks

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def fail(message):
    cli_checks.fail("show_masks.py", message)


def get_args_parser():
    p = Parser("show_masks.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="train.py's checkpoint.pth, or a released run folder or .ckpt")
    p.add_argument("--out", default=None, help="output folder (default: masks/ beside the checkpoint)")
    p.add_argument("--released_view", action="store_true",
                   help="the released test view of the model's dataset (ImageNet100-S: the central 96 × 96 of "
                        "a 256-px resize) instead of the whole photo")
    p.add_argument("--batch_size", type=int, default=16, help="images per masker call")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    return p


def load_masker(path):
    """(the learned masker M_φ in eval mode, train.py's arguments as a dict) of any checkpoint, or one line."""
    if not os.path.exists(path):
        fail(f"--ckpt {path}: no such file or folder")
    if released.is_released_path(path):
        try:
            model, args = released.load_released(path)
        except released.ReleasedError as e:
            fail(f"--ckpt {path}: {e}")
        return model.masker, vars(args)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--ckpt {path} is not a readable checkpoint ({type(e).__name__})")
    if not (isinstance(ckpt, dict) and {"model", "args"} <= ckpt.keys()):
        fail(f"--ckpt {path} is neither a checkpoint of train.py nor a released run (folder or .ckpt)")
    masker = learned_masker(ckpt)
    if masker is None:
        fail(f"--ckpt {path} has no learned masks (N = 0, or random/block masks): nothing to show")
    return masker, ckpt["args"]


def image_paths(names):
    """Every image named, folders expanded to the image files inside them (sorted); one line if none."""
    paths = []
    for name in names:
        if os.path.isdir(name):
            found = sorted(os.path.join(name, f) for f in os.listdir(name) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                fail(f"{name}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            paths += found
        elif os.path.isfile(name):
            paths.append(name)
        else:
            fail(f"{name}: no such image file or folder")
    return paths


def read_image(path, view):
    """One photo as the model sees it: EXIF orientation applied, RGB, then `view` → (3, H, W) normalised."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        fail(f"{path}: cannot be read as an image ({type(e).__name__}); remove it or name other files")
    return view(image)


@torch.no_grad()
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        fail(f"--batch_size {args.batch_size}: must be at least 1")
    paths = image_paths(args.images)                          # the photos first: no model load for a typo
    masker, train_args = load_masker(args.ckpt)
    size, dataset = train_args["img_size"], train_args["dataset"]
    info = data.dataset_info(dataset)
    resize = data.eval_resize(dataset, size) if args.released_view else None     # None: the whole short side
    view = data.eval_transform(size, info["mean"], info["std"], resize)
    images = torch.stack([read_image(p, view) for p in paths])               # (B, 3, H, W)
    masks = torch.cat([masker(x) for x in images.split(args.batch_size)])    # (B, N, H, W)

    ckpt_dir = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
    if os.path.isdir(args.ckpt) and not os.path.isfile(os.path.join(args.ckpt, "args.json")):
        ckpt_dir = train_args["output_dir"]                   # <run name>/ given: its <run id>/ folder
    out = args.out or os.path.join(ckpt_dir, "masks")
    try:
        os.makedirs(out, exist_ok=True)
        draw_masks(images, masks, info["mean"], info["std"], os.path.join(out, "masks.png"))
        torch.save({"images": images, "masks": masks}, os.path.join(out, "masks.pt"))
    except OSError as e:
        fail(f"--out {out} cannot be written ({e.strerror or e}): choose another folder")
    print(f"show_masks.py: {len(paths)} image(s), {masks.shape[1]} masks each at {size} px "
          f"({'released test view' if args.released_view else 'whole photo'}) → {out}/masks.png, {out}/masks.pt")
    return out


if __name__ == "__main__":
    main()
