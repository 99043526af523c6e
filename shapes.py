"""shapes: the embedded synthetic dataset with known objects, drawn on the fly (no files, no download).

One to three discs, squares, triangles or crosses on a textured background; the label is the class of
the object with the most visible pixels, and every image comes with its true object map, so the
masks ADIOS learns can be scored against the objects (README: "Evidence on shapes").
"""
import numpy as np
import torch
from PIL import Image

# The generator's version, stored in a run's arguments: a run folder made with other images is never
# resumed or reported complete for these (raise it whenever render_shapes draws differently).
VERSION = 1
SHAPE_CLASSES = ("disc", "square", "triangle", "cross")
SPLIT_IDS = {"train": 0, "test": 1}


def _background(rng, yy, xx, size):
    """A random colour gradient plus coloured stripes, so that 'flat colour = background' is no shortcut."""
    colour_a, colour_b = rng.uniform(0.15, 0.85, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5, 0, 1)
    img = colour_a + t[..., None] * (colour_b - colour_a)  # (H, W, 3)
    cycles, stripe_angle, phase = rng.uniform(2, 6), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    along = (xx * np.cos(stripe_angle) + yy * np.sin(stripe_angle)) / size
    stripes = np.sin(2 * np.pi * cycles * along + phase)  # (H, W)
    return img + 0.1 * stripes[..., None] * rng.uniform(-1, 1, size=3)  # (H, W, 3)


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
    img = _background(rng, yy, xx, img_size)  # (H, W, 3) floats
    object_map = np.zeros((img_size, img_size), dtype=np.int64)
    kinds = rng.integers(0, len(SHAPE_CLASSES), size=rng.integers(1, 4))  # one to three objects
    for k, kind in enumerate(kinds, start=1):
        # The first object is big (14-20 px across at 32 px) and drawn first; the others are smaller
        # distractors (8-12 px) drawn over it. So one object usually dominates (a clear label) and is often
        # partly occluded, and every object still counts for the object map.
        r = (rng.uniform(7, 10) if k == 1 else rng.uniform(4, 6)) * img_size / 32
        cy, cx = rng.uniform(r, img_size - r, size=2)
        mask = _shape_mask(kind, yy - cy, xx - cx, r, rng.uniform(0, 2 * np.pi))
        # Of three random colours take the one farthest from the background under the centre: always visible.
        candidates = rng.uniform(0, 1, size=(3, 3))
        local = img[int(cy), int(cx)]
        img[mask] = candidates[np.abs(candidates - local).sum(1).argmax()]
        object_map[mask] = k  # later objects occlude earlier ones
    img = img + rng.normal(0, 0.03, size=img.shape)  # pixel noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), object_map, kinds


class Shapes(torch.utils.data.Dataset):
    """One to three shapes on a textured background; label = class of the object with most visible pixels.

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
