"""How well masks find the objects: the paper's adjusted Rand index (ARI) of the argmax slot map against the
true object segmentation, over all pixels and on the foreground only, and the best IoU per object. Measured
on shapes, whose object maps are known (shapes.py). Used by monitor.py every epoch and by eval_linear.py.
README: "Evidence on shapes".
"""
import torch
import torch.nn.functional as F

from data import dataset_info, eval_transform
from shapes import Shapes


def adjusted_rand_index(pred, true, ignore=None):
    """Adjusted Rand index (Hubert & Arabie 1985) per image, averaged over the batch (a float).

    pred, true: int tensors (B, H, W) or (B, P), any label values. ignore: a label of `true` whose
    pixels are left out (ignore=0: the foreground-only ARI). From the contingency table n_ij of each
    image, with a_i, b_j its row and column sums and n its total:
        ARI = (Σ C(n_ij,2) − E) / (½(Σ C(a_i,2) + Σ C(b_j,2)) − E),  E = Σ C(a_i,2) Σ C(b_j,2) / C(n,2).
    Degenerate cases: the denominator is 0 only when both maps are one cluster, or both are all
    singletons; the maps then agree and the ARI is 1 (as scikit-learn). An image with fewer than two
    counted pixels has no pairs: it is left out of the mean (NaN if every image is).
    """
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must have the same shape")
    pred, true = pred.flatten(1), true.flatten(1)             # (B, P)
    B = pred.shape[0]
    counted = torch.ones_like(true, dtype=torch.bool) if ignore is None else true != ignore
    # Relabel both maps 0..K−1 over the batch, so one bincount fills every image's table.
    p = torch.unique(pred, return_inverse=True)[1]            # (B, P) in [0, Kp)
    t = torch.unique(true, return_inverse=True)[1]            # (B, P) in [0, Kt)
    Kp, Kt = int(p.max()) + 1, int(t.max()) + 1
    image = torch.arange(B, device=pred.device).view(B, 1).expand_as(p)
    cell = (image * Kp + p) * Kt + t                          # (B, P): flat index into (B, Kp, Kt)
    table = torch.bincount(cell[counted], minlength=B * Kp * Kt).view(B, Kp, Kt).double()   # n_ij

    def pairs(n):
        return n * (n - 1) / 2                                # C(n, 2)

    index = pairs(table).sum(dim=(1, 2))                      # (B,)
    rows, cols = pairs(table.sum(2)).sum(1), pairs(table.sum(1)).sum(1)   # (B,) each
    total = pairs(table.sum(dim=(1, 2)))                      # (B,)
    expected = rows * cols / total.clamp(min=1)
    maximum = (rows + cols) / 2
    ari = (index - expected) / (maximum - expected)
    ari = torch.where(maximum == expected, torch.ones_like(ari), ari)     # identical trivial maps
    ari = torch.where(total > 0, ari, torch.full_like(ari, float("nan")))  # no pixel pairs
    return ari.nanmean().item()


@torch.no_grad()
def mask_quality(masks, objects):
    """How well the N slots cover the true objects: dict of ari, ari_fg and miou (floats in [−1, 1]/[0, 1]).

    masks: (B, N, H, W) soft masks; objects: (B, H, W) int, 0 = background, 1..K objects.
    ari: argmax slot map vs the full object map (background is one more segment);
    ari_fg: the same on foreground pixels only;
    miou: for every object (not the background), the best IoU over the N binarised argmax slots,
          averaged over all objects of the batch.
    """
    slots = masks.argmax(dim=1)                               # (B, H, W) hard slot map
    N, K = masks.shape[1], int(objects.max()) + 1
    in_slot = F.one_hot(slots.flatten(1), N).float()          # (B, P, N)
    in_object = F.one_hot(objects.flatten(1).long(), K).float()         # (B, P, K)
    inter = in_object.transpose(1, 2) @ in_slot               # (B, K, N) pixels in both
    union = in_object.sum(1)[:, :, None] + in_slot.sum(1)[:, None, :] - inter
    best = (inter / union.clamp(min=1)).amax(dim=2)           # (B, K) best slot per object
    present = in_object.sum(1) > 0                            # (B, K)
    present[:, 0] = False                                     # the background is not an object
    return dict(ari=adjusted_rand_index(slots, objects),
                ari_fg=adjusted_rand_index(slots, objects, ignore=0),
                miou=best[present].mean().item())


@torch.no_grad()
def shapes_mask_quality(masker, num_images, device, seed=0, batch_size=128):
    """mask_quality of a learned masker on the first num_images of the shapes test split."""
    info = dataset_info("shapes")
    size = masker.img_size                                    # the masker takes only its own size
    shapes = Shapes("test", size, num_images, seed, transform=eval_transform(size, info["mean"], info["std"]))
    images = torch.stack([shapes[i][0] for i in range(num_images)])                  # (n, 3, H, W)
    objects = torch.stack([torch.from_numpy(shapes.object_map(i)) for i in range(num_images)])  # (n, H, W)
    masks = torch.cat([masker(x.to(device)).cpu() for x in images.split(batch_size)])  # (n, N, H, W)
    return mask_quality(masks, objects)
