"""shapes: the embedded synthetic dataset with known objects, drawn on the fly (no files, no download).

One large disc, square, triangle or cross with one small distractor drawn over it, on a flat grey
background; the label is the class of the large object (the one with the most visible pixels), and every
image comes with its true object map, so the masks ADIOS learns can be scored against the objects
(README: "Evidence on shapes"). Both objects are near-grey, on the other side of the background's
brightness: no colour or texture tells the classes apart, only the outline does.
"""
import numpy as np
import torch
from PIL import Image

# The generator's version, stored in a run's arguments: a run folder made with other images is never
# resumed or reported complete for these (raise it whenever render_shapes draws differently).
VERSION = 2
SHAPE_CLASSES = ("disc", "square", "triangle", "cross")
SPLIT_IDS = {"train": 0, "test": 1}


def _near_grey(rng, level):
    """An RGB colour (3,) of brightness `level` with a faint tint: grey enough that colour is no cue."""
    return np.clip(level + rng.uniform(-0.04, 0.04, size=3), 0, 1)


def _shape_mask(kind, dy, dx, r, angle):
    """Boolean (H, W) mask of one shape of 'radius' r centred at dy = dx = 0, rotated by angle.

    The sizes are set so every class covers about pi r^2 pixels: the label (largest object) then does not
    favour one class, and size is no cue to the class.
    """
    u = dx * np.cos(angle) + dy * np.sin(angle)  # coordinates in the shape's own frame
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == 0:  # disc
        return u * u + v * v <= r * r
    if kind == 1:  # square, half-side h: 4 h^2 = pi r^2
        h = 0.886 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if kind == 2:  # equilateral triangle, inradius rho: 3 sqrt(3) rho^2 = pi r^2
        rho = 0.778 * r
        sides = [u * np.cos(a) + v * np.sin(a) <= rho for a in np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3]
        return sides[0] & sides[1] & sides[2]  # inside all three edges
    arm, half_width = 1.19 * r, 1.19 * r / 3  # cross: two bars, area 20/9 arm^2 = pi r^2
    return ((np.abs(u) <= arm) & (np.abs(v) <= half_width)) | ((np.abs(v) <= arm) & (np.abs(u) <= half_width))


def render_shapes(seed, split_id, index, img_size):
    """Draw image `index`: uint8 (H, W, 3) image, int64 (H, W) object map (0 background, k = k-th object), kinds.

    Everything comes from np.random.default_rng([seed, split_id, index]): the same triple always gives the
    same image, and train (split_id 0) and test (split_id 1) draw from different seed sequences, so their
    images are independent draws (with per-pixel noise, two equal images have probability ~0).
    """
    rng = np.random.default_rng([seed, split_id, index])
    yy, xx = np.mgrid[0:img_size, 0:img_size] + 0.5  # pixel centres, (H, W) each
    background = rng.uniform(0.3, 0.7)  # flat grey level
    side = -1.0 if background > 0.5 else 1.0  # the objects sit on the other side of mid-grey
    img = np.full((img_size, img_size, 3), background)  # (H, W, 3) floats
    object_map = np.zeros((img_size, img_size), dtype=np.int64)
    kinds = rng.integers(0, len(SHAPE_CLASSES), size=2)  # the large object, then the distractor
    # The large object (20-26 px across at 32 px) carries the label; the distractor (8-12 px) is drawn over
    # it, centred inside it, so it always occludes part of it yet never covers the most pixels (at most
    # 113 of the large object's >= 314). Contrast: large 0.3-0.45 from the background, distractor 0.1-0.2
    # (same side), so each stands apart from the other and from the background.
    r_big = rng.uniform(10, 13) * img_size / 32
    cy, cx = rng.uniform(r_big, img_size - r_big, size=2)
    for k, (r, contrast) in enumerate([(r_big, rng.uniform(0.3, 0.45)),
                                       (rng.uniform(4, 6) * img_size / 32, rng.uniform(0.1, 0.2))], start=1):
        if k == 2:  # the distractor's centre: anywhere within half the large object's radius of its centre
            cy, cx = np.array([cy, cx]) + rng.uniform(-0.5, 0.5, size=2) * r_big
        mask = _shape_mask(kinds[k - 1], yy - cy, xx - cx, r, rng.uniform(0, 2 * np.pi))
        img[mask] = _near_grey(rng, background + side * contrast)
        object_map[mask] = k  # the distractor occludes the large object
    img = img + rng.normal(0, 0.03, size=img.shape)  # pixel noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), object_map, kinds


class Shapes(torch.utils.data.Dataset):
    """A large shape and a small distractor on flat grey; label = class of the object with most visible pixels.

    Images are generated from (seed, split, index) when asked for: no files, and image i never changes.
    """

    classes = SHAPE_CLASSES
    num_classes = len(SHAPE_CLASSES)

    def __init__(self, split="train", img_size=32, num_images=4096, seed=0, transform=None):
        if split not in SPLIT_IDS:
            raise ValueError(f"Shapes split must be one of {list(SPLIT_IDS)}, not {split!r}")
        self.split, self.img_size, self.num_images, self.seed = split, img_size, num_images, seed
        self.transform = transform

    def __len__(self):
        return self.num_images

    def render(self, i):
        """uint8 (H, W, 3) image, int64 (H, W) object map, and the class index of each object."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        return render_shapes(self.seed, SPLIT_IDS[self.split], i, self.img_size)

    def object_map(self, i):
        """int64 (H, W): 0 background, k = 1..K the visible pixels of the k-th object drawn."""
        return self.render(i)[1]

    def label(self, i):
        """Class index of the object with the most visible pixels (after occlusion)."""
        return largest_object_class(*self.render(i)[1:])

    def __getitem__(self, i):
        img, object_map, kinds = self.render(i)
        pil = Image.fromarray(img)
        return (pil if self.transform is None else self.transform(pil)), largest_object_class(object_map, kinds)


def largest_object_class(object_map, kinds):
    visible = np.bincount(object_map.ravel(), minlength=len(kinds) + 1)[1:]  # pixels per object, (K,)
    return int(kinds[visible.argmax()])
