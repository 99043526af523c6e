"""The authors' released checkpoints load exactly (released.py), and show_masks.py and eval_linear.py take them.

Every checkpoint here is written in the released layout, built in this file from the released definitions
(module names and shapes of the released methods, U-Net, torchvision ResNet and timm ViT), with every
tensor set to its own values. The references are computed from those tensors placed by hand, with
forwards written here from the released (and timm's) definitions, never through released.py's key map.
"""
import json
import math
import pickle
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import eval_linear
import released
import show_masks

IMG, N, C = 32, 3, 8                       # small runs: 32-px images (64 for ADIOS-s), 3 masks, U-Net width 8
PROJ, OUT, PRED, CLASSES = 64, 32, 48, 5


# ---- the released modules, by the released definitions -----------------------------------------------

class UNet(nn.Module):
    """The released U-Net's layout (blocks conv → norm → ReLU; a Flatten first in the MLP) and forward."""

    def __init__(self, blocks, img_size, c, norm):
        super().__init__()
        widths = {4: ([3, c, 2 * c, 2 * c], [c, 2 * c, 2 * c, 2 * c], [4 * c, 4 * c, 4 * c, 2 * c], [2 * c, 2 * c, c, c]),
                  5: ([3, c, c, 2 * c, 2 * c], [c, c, 2 * c, 2 * c, 2 * c], [4 * c, 4 * c, 4 * c, 2 * c, 2 * c],
                      [2 * c, 2 * c, c, c, c])}[blocks]

        def block(i, o):
            if norm == "no":
                return nn.Sequential(nn.Conv2d(i, o, 3, 1, 1), nn.ReLU())
            layer = nn.GroupNorm(8, o) if norm == "gn" else nn.InstanceNorm2d(o, affine=True)
            return nn.Sequential(nn.Conv2d(i, o, 3, 1, 1, bias=False), layer, nn.ReLU())

        self.down = nn.ModuleList(block(i, o) for i, o in zip(widths[0], widths[1]))
        self.up = nn.ModuleList(block(i, o) for i, o in zip(widths[2], widths[3]))
        self.f = img_size // 2 ** (blocks - 1)
        flat = 2 * c * self.f ** 2
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, flat), nn.ReLU())

    def forward(self, x):
        skips = []
        for i, b in enumerate(self.down):
            x = b(x)
            skips.append(x)
            if i < len(self.down) - 1:
                x = F.interpolate(x, scale_factor=0.5, mode="nearest", recompute_scale_factor=True)
        x = self.mlp(x).view(x.shape[0], -1, self.f, self.f)
        for i, b in enumerate(self.up):
            x = b(torch.cat([x, skips[-1 - i]], dim=1))
            if i < len(self.up) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest", recompute_scale_factor=True)
        return x


class TimmBlock(nn.Module):
    """timm's ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)); attention from one fused qkv Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attention(self, x):                                   # (B, T, D)
        B, T, D = x.shape
        qkv = self.attn.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                      # (B, heads, T, D / heads) each
        weights = ((q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5).softmax(dim=-1)
        return self.attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """timm's VisionTransformer (vit_tiny_patch16_224 built at img_size, num_classes=0): names and forward."""

    def __init__(self, img_size, dim=192, depth=12, heads=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // 16) ** 2 + 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
        self.blocks = nn.ModuleList(TimmBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)              # (B, patches, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def released_encoder(arch, img_size):
    if arch == "vit_tiny":
        return TimmViT(img_size), 192
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    return net, 512


def released_heads(method, feat):
    if method == "simclr":
        return nn.Sequential(nn.Linear(feat, PROJ), nn.ReLU(), nn.Linear(PROJ, OUT)), None
    if method == "byol":
        mlp = lambda i, h, o: nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))  # noqa: E731
        return mlp(feat, PROJ, OUT), mlp(OUT, PRED, OUT)
    projector = nn.Sequential(nn.Linear(feat, PROJ, bias=False), nn.BatchNorm1d(PROJ), nn.ReLU(),
                              nn.Linear(PROJ, PROJ, bias=False), nn.BatchNorm1d(PROJ), nn.ReLU(),
                              nn.Linear(PROJ, OUT), nn.BatchNorm1d(OUT, affine=False))     # projector.6 has a bias
    predictor = nn.Sequential(nn.Linear(OUT, PRED, bias=False), nn.BatchNorm1d(PRED), nn.ReLU(), nn.Linear(PRED, OUT))
    return projector, predictor


class ReleasedModel(nn.Module):
    """The attribute names of the released methods (base.py, *_adios*.py): its state_dict is a released one."""

    def __init__(self, method, arch, img_size, blocks, norm):
        super().__init__()
        self.encoder, feat = released_encoder(arch, img_size)
        self.classifier = nn.Linear(feat, CLASSES)
        self.projector, predictor = released_heads(method, feat)
        if predictor is not None:
            self.predictor = predictor
        if method == "byol":
            self.momentum_encoder = released_encoder(arch, img_size)[0]
            self.momentum_projector = released_heads(method, feat)[0]
        self.mask_encoder = UNet(blocks, img_size, C, norm)
        self.mask_head = nn.Sequential(nn.Conv2d(C, N, 1, 1, 0), nn.Softmax(dim=1))


def distinct_values(model):
    """Every tensor its own values (a seed per tensor), scaled to keep activations finite and varied."""
    with torch.no_grad():
        for i, (name, t) in enumerate(model.state_dict().items()):
            g = torch.Generator().manual_seed(1000 + i)
            if not t.is_floating_point():
                t.fill_(i + 1)                                # num_batches_tracked
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.dim() >= 2 and not name.endswith(("cls_token", "pos_embed")):
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            elif name.endswith("weight") and t.dim() == 1:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
    return model.eval()


CASES = {  # name: (released method, arch, img_size, unet_norm)
    "simclr_resnet18": ("simclr_adios", "resnet18", IMG, "gn"),
    "byol_resnet18": ("byol_adios", "resnet18", IMG, "in"),
    "simsiam_resnet18": ("simsiam_adios", "resnet18", IMG, "gn"),
    "simclr_vit": ("simclr_adios", "vit_tiny", IMG, "no"),
    "byol_vit": ("byol_adios", "vit_tiny", IMG, "gn"),
    "simsiam_vit": ("simsiam_adios", "vit_tiny", IMG, "gn"),
    "simclr_s_resnet18": ("simclr_adios_s", "resnet18", 64, "gn"),
    "byol_s_resnet18": ("byol_adios_s", "resnet18", 64, "gn"),
    "simsiam_s_resnet18": ("simsiam_adios_s", "resnet18", 64, "gn"),
}


def released_args(method, arch, img_size, norm):
    """args.json as the released code writes it (a subset of its many flags), with the authors' paths."""
    base = method.split("_")[0]
    args = dict(method=method, encoder=arch, dataset="imagenet100s", img_size=img_size, n_classes=CLASSES, N=N,
                mask_fbase=C, unet_norm=norm, output_dim=OUT, proj_hidden_dim=PROJ, cifar=False, lr=0.3,
                mask_lr=0.05, weight_decay=1e-5, batch_size=128, max_epochs=300, alpha_sparsity=0.9,
                alpha_entropy=0.0, warmup_epochs=10, brightness=[0.4], contrast=[0.4], saturation=[0.2], hue=[0.1],
                data_dir="/authors/datasets", checkpoint_dir="/authors/trained_models", wandb_dir="/authors/wandb",
                gpus=[0], precision=16, name="adios-run", project="adios", temperature=0.2)
    if base != "simclr":
        args["pred_hidden_dim"] = PRED
    if base == "byol":
        args["train_mask_epoch"] = 10
    if base == "simsiam":
        args.update(num_blocks=4, use_no_mask=True, use_symmetry_mask=False, use_both_mask=True)
    return args


def write_run(folder, model, args, callbacks=None):
    """A run folder as a released zip unpacks: <run name>/<run id>/{args.json, <name>-<id>-ep=N.ckpt}."""
    run = folder / "adios-run" / "1a2b3c4d"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(args))
    ckpt = {"epoch": 299, "global_step": 1000, "pytorch-lightning_version": "1.4.7",
            "state_dict": model.state_dict(), "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [{"last_epoch": 300}], "callbacks": callbacks or {}}
    torch.save(ckpt, run / "adios-run-1a2b3c4d-ep=299.ckpt")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (run folder, the released model holding the tensors written)} for every case."""
    out = {}
    for case, (method, arch, size, norm) in CASES.items():
        blocks = 4 if method.startswith("simsiam") else int(math.log2(size) - 1)
        model = distinct_values(ReleasedModel(method.split("_")[0], arch, size, blocks, norm))
        out[case] = write_run(tmp_path_factory.mktemp(case), model, released_args(method, arch, size, norm)), model
    return out


# ---- loading is exact ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_loads_and_every_output_matches_the_released_modules(case, runs):
    folder, theirs = runs[case]
    method, arch, size, _ = CASES[case]
    model, args = released.load_released(str(folder))
    assert not model.training and args.arch == arch and args.img_size == size and args.num_masks == N
    assert args.single_mask == method.endswith("_s") and args.method == method.split("_")[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_h = theirs.encoder(x)
        ref_masks = theirs.mask_head(theirs.mask_encoder(x))                 # (B, N, H, W)
        out = model.net(x, classify=True)
        assert torch.allclose(model.masker(x), ref_masks, atol=1e-6)
        assert torch.allclose(out.h, ref_h, rtol=1e-4, atol=1e-5), (out.h - ref_h).abs().max()
        assert torch.allclose(out.z, theirs.projector(ref_h), rtol=1e-4, atol=1e-5)   # SimSiam: the bias folded
        assert torch.allclose(out.logits, theirs.classifier(ref_h), rtol=1e-4, atol=1e-5)
        if hasattr(theirs, "predictor"):
            assert torch.allclose(out.p, theirs.predictor(theirs.projector(ref_h)), rtol=1e-4, atol=1e-5)
        if method.startswith("byol"):
            ref_t = theirs.momentum_projector(theirs.momentum_encoder(x))
            assert torch.allclose(model.target(x).z, ref_t, rtol=1e-4, atol=1e-5)
    if arch == "resnet18":                                   # the same names as torchvision: placed by hand
        by_hand = {k[len("encoder."):]: v for k, v in theirs.state_dict().items() if k.startswith("encoder.")}
        mine = model.net.encoder.state_dict()
        assert by_hand.keys() == mine.keys() and all(torch.equal(by_hand[k], mine[k]) for k in mine)


def test_simsiam_bias_is_folded_into_the_running_mean(runs):
    folder, theirs = runs["simsiam_resnet18"]
    model, _ = released.load_released(str(folder))
    bias = theirs.projector[6].bias
    assert bias.abs().min() > 0
    assert torch.allclose(model.net.projector[7].running_mean, theirs.projector[7].running_mean - bias)
    h = torch.randn(4, 512)
    with torch.no_grad():
        assert torch.allclose(model.net.projector(h), theirs.projector(h), atol=1e-5)


def test_args_are_train_py_arguments_without_the_authors_paths(runs):
    folder, _ = runs["byol_resnet18"]
    _, args = released.load_released(str(folder))
    assert args.data_dir == "./data" and args.output_dir == str(folder)
    assert "/authors" not in json.dumps(vars(args), default=str)
    assert (args.dataset, args.mask_norm, args.mask_blocks, args.stem) == ("imagenet100", "in", 4, "standard")
    assert (args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim) == (PROJ, OUT, PRED)
    assert (args.lr, args.alpha, args.epochs, args.encoder_early_end) == (0.3, 0.9, 300, 10)
    assert args.jitter == [0.4, 0.4, 0.2, 0.1]
    _, siam = released.load_released(str(runs["simsiam_resnet18"][0]))
    assert (siam.simsiam_unmasked, siam.simsiam_masked_targets, siam.simsiam_both_masked) == (True, False, True)


def test_the_ckpt_file_itself_and_the_run_name_folder_load(runs):
    folder, _ = runs["simclr_resnet18"]
    ckpt = next(folder.glob("*.ckpt"))
    for path in (ckpt, folder.parent):                        # the .ckpt, and <run name>/ above <run id>/
        model, args = released.load_released(str(path))
        assert args.output_dir == str(folder)


def test_a_key_that_does_not_fit_is_refused_by_name(tmp_path, runs):
    _, theirs = runs["simclr_resnet18"]
    args = released_args(*CASES["simclr_resnet18"])
    extra = dict(theirs.state_dict(), **{"momentum_classifier.weight": torch.zeros(CLASSES, 512)})
    run = write_run(tmp_path / "extra", nn.Module(), args)
    torch.save({"pytorch-lightning_version": "1.4.7", "state_dict": extra}, next(run.glob("*.ckpt")))
    with pytest.raises(released.ReleasedError, match="momentum_classifier.weight"):
        released.load_released(str(run))
    short = {k: v for k, v in theirs.state_dict().items() if k != "mask_head.0.bias"}
    torch.save({"pytorch-lightning_version": "1.4.7", "state_dict": short}, next(run.glob("*.ckpt")))
    with pytest.raises(released.ReleasedError, match="masker.head.bias"):
        released.load_released(str(run))
    for changed, name in (({k: v for k, v in args.items() if k != "mask_fbase"}, "mask_fbase"),
                          (dict(args, cifar=True), "cifar"), (dict(args, method="simclr_gt"), "method")):
        (run / "args.json").write_text(json.dumps(changed))
        with pytest.raises(released.ReleasedError, match=name):
            released.load_released(str(run))


class LoggerCallback:
    """A stand-in for a Lightning callback class: its module disappears before loading."""


def test_callbacks_keyed_by_a_class_are_skipped_never_imported(tmp_path, runs):
    _, theirs = runs["simclr_resnet18"]
    module = types.ModuleType("lightning_callbacks_gone")     # importable only while saving
    LoggerCallback.__module__ = module.__name__
    module.LoggerCallback = LoggerCallback
    sys.modules[module.__name__] = module
    try:
        run = write_run(tmp_path, theirs, released_args(*CASES["simclr_resnet18"]),
                        callbacks={LoggerCallback: {"best": torch.tensor(1.0), "dirpath": "/authors"}})
    finally:
        del sys.modules[module.__name__]
    ckpt = next(run.glob("*.ckpt"))
    with pytest.raises(pickle.UnpicklingError):               # a plain safe load refuses the class key
        torch.load(ckpt, weights_only=True)
    with pytest.raises(ModuleNotFoundError):                  # and an unsafe one would have to import it
        torch.load(ckpt, weights_only=False)
    model, _ = released.load_released(str(run))
    assert torch.equal(model.net.classifier.weight, theirs.classifier.weight)


def test_a_file_neither_ours_nor_theirs_is_one_line(tmp_path, runs):
    run = write_run(tmp_path, nn.Linear(1, 1), released_args(*CASES["simclr_resnet18"]))
    ckpt = next(run.glob("*.ckpt"))
    for content in ({"weights": torch.zeros(2)}, {"model": {}, "args": {}}):
        torch.save(content, ckpt)
        with pytest.raises(released.ReleasedError) as e:
            released.load_released(str(ckpt))
        assert "\n" not in str(e.value)
    ckpt.write_text("not a checkpoint")
    with pytest.raises(released.ReleasedError, match="not a readable checkpoint"):
        released.load_released(str(ckpt))


# ---- show_masks.py and eval_linear.py on them -----------------------------------------------------------

def photo(path, size, mode="RGB", seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def test_show_masks_draws_the_masks_of_any_photo(tmp_path, runs):
    folder, theirs = runs["simclr_vit"]
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "wide.png", (80, 40))
    photo(photos / "grey.png", (40, 60), mode="L", seed=1)
    single = photo(tmp_path / "rgba.png", (50, 50), mode="RGBA", seed=2)
    out = tmp_path / "out"
    show_masks.main(["--ckpt", str(folder), "--out", str(out), str(photos), str(single)])
    saved = torch.load(out / "masks.pt", weights_only=True)
    images, masks = saved["images"], saved["masks"]
    assert images.shape == (3, 3, IMG, IMG) and masks.shape == (3, N, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(masks, theirs.mask_head(theirs.mask_encoder(images)), atol=1e-6)
    assert torch.allclose(masks.sum(1), torch.ones(3, IMG, IMG), atol=1e-5)
    picture = Image.open(out / "masks.png")
    assert picture.size == ((1 + 2 * N) * (IMG + 1) + 1, 3 * (IMG + 1) + 1)     # make_grid, 1-px padding
    info = data.dataset_info("imagenet100")
    rgb = Image.open(single).convert("RGB")
    assert torch.allclose(images[2], data.eval_transform(IMG, info["mean"], info["std"])(rgb))    # the whole photo
    show_masks.main(["--ckpt", str(folder), "--released_view", str(single)])                # default DIR
    released_view = torch.load(folder / "masks" / "masks.pt", weights_only=True)["images"][0]
    assert torch.allclose(released_view, data.eval_transform(IMG, info["mean"], info["std"], 256)(rgb))
    assert (folder / "masks" / "masks.png").exists()


def test_show_masks_whole_photo_and_exif(tmp_path):
    """The default view keeps the whole short side (centre square) and applies the EXIF orientation."""
    stored = torch.zeros(3, 20, 40)                           # 40 wide, 20 tall as stored
    stored[0, :10] = 1.0                                      # its top half red
    image = Image.fromarray((stored.permute(1, 2, 0) * 255).byte().numpy())
    exif = Image.Exif()
    exif[0x0112] = 6                                          # "rotate 90° clockwise to display": 20 wide, 40 tall
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    x = show_masks.read_image(str(tmp_path / "rot.jpg"), data.eval_transform(20, (0.0,) * 3, (1.0,) * 3))
    assert x.shape == (3, 20, 20)                             # the centre square of the whole photo
    assert x[0, :, 14:].min() > 0.8 and x[0, :, :6].max() < 0.2          # stored top → displayed right


def test_show_masks_mistakes_are_one_line(tmp_path, runs, capsys):
    folder, _ = runs["simclr_resnet18"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_text("not an image")
    for argv, expected in ((["nothing.jpg"], "nothing.jpg"), ([str(tmp_path / "empty")], "empty"),
                           ([str(tmp_path / "bad.jpg")], "bad.jpg")):
        with pytest.raises(SystemExit) as e:
            show_masks.main(["--ckpt", str(folder), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        show_masks.main(["--ckpt", str(tmp_path / "none.ckpt"), str(tmp_path / "bad.jpg")])
    assert e.value.code == 2 and "none.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["byol_resnet18", "simsiam_vit"])
def test_eval_linear_takes_a_released_run(case, runs, tmp_path):
    folder, theirs = runs[case]
    result = eval_linear.main(["--ckpt", str(folder), "--dataset", "shapes", "--num_images", "64", "--epochs", "1",
                               "--knn", "--workers", "0", "--device", "cpu", "--mask_images", "16",
                               "--output", str(tmp_path / "e.json")])
    assert result["img_size"] == IMG and result["arch"] == CASES[case][1]
    assert 0 <= result["top1"] <= 100 and 0 <= result["knn_top1"] <= 100 and result["mask_quality"] is not None


def test_eval_linear_released_protocol_and_test_dirs(runs, tmp_path):
    folder, _ = runs["simclr_resnet18"]
    for split in ("train", "val", "other/val"):
        for k, cls in enumerate(("a", "b")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                photo(tmp_path / "data" / split / cls / f"{i}.png", (40, 36), seed=10 * k + i)
    result = eval_linear.main(["--ckpt", str(next(folder.glob("*.ckpt"))), "--dataset", "imagefolder",
                               "--data_dir", str(tmp_path / "data"), "--augment", "--epochs", "1", "--workers", "0",
                               "--device", "cpu", "--test_dirs", str(tmp_path / "data" / "other"),
                               "--batch_size", "4"])
    assert result["protocol"] == "augmented" and result["img_size"] == IMG
    assert set(result["test_dirs"]) == {str(tmp_path / "data" / "other")}
    assert (folder / "eval_imagefolder_augmented.json").exists()     # beside the checkpoint
