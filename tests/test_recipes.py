"""The 15 released training runs, checked against the presets of recipes.py (as train.py --dry_run resolves
them); and the recipes' defaults, default folders and the global batch.

The authors of ADIOS released one shell script per training run:
bash_files/training/<folder>/<method>_adios[_s].sh of github.com/YugeTen/adios, for the folders
stl10/resnet18, stl10/vittiny, imagenet100s/resnet18, imagenet100s/vittiny (ImageNet100 at 96 px) and
imagenet100/resnet18 (ImageNet100 at 224 px, the single-mask variant "ADIOS-s"). Each script passes
some flags to the released main_pretrain.py; every flag a script leaves out takes the released
argparse default (src/args/dataset.py, src/methods/base.py, src/methods/base_adios.py and the
src/methods/<method>_adios[_s].py files of the same repository).

SCRIPTS below copies, for every script, the flags that change the result, with the values exactly as
the script writes them (full precision: 0.13234838295784523, not 0.132). RELEASED_DEFAULTS holds the
defaults those runs fall back on. `released_run` combines the two into the values the run actually
used, under this project's flag names, and each test asks train.py, with the command a user would
type for that run plus --dry_run, for the resolved arguments and compares every value.

How the released names map onto ours:
    max_epochs -> epochs               alpha_sparsity -> alpha          N -> num_masks
    mask_fbase -> mask_channels        unet_norm -> mask_norm ("no" -> "none")
    output_dim -> proj_output_dim      brightness/contrast/saturation/hue -> jitter [b, c, s, h]
    optimizer sgd + lars (on by default) -> optimizer "lars"
    train_mask_epoch -> encoder_early_end   num_blocks -> mask_blocks   *_adios_s -> single_mask
SimSiam's extra terms (the always-on term is masked p vs clean z):
    use_no_mask       (p1 vs z2, p2 vs z1: nothing masked)          -> simsiam_unmasked
    use_symmetry_mask (p2 vs masked z1, p1 vs masked z2)            -> simsiam_masked_targets
    use_both_mask     (masked p1 vs masked z2, masked p2 vs masked z1) -> simsiam_both_masked
SimCLR and BYOL have no --num_blocks: their U-Net always has int(log2(img_size) - 1) blocks
(5 at 96 px, 6 at 224 px). SimSiam has the flag (default 4) and every SimSiam script sets it.
"""
import math
import os

import pytest

import recipes
import train
from helpers import TINY

# ---- what each released script sets -----------------------------------------------------------------
# Flags that only name directories, logging or the GPU (--data_dir, --wandb*, --checkpoint_dir, --project,
# --entity, --name, --gpus 0) are left out: every run used one GPU. --scheduler warmup_cosine is set by
# all 15 scripts and is the only schedule train.py has.
SCRIPTS = {
    "stl10/resnet18/simclr_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.0, batch_size=256, classifier_lr=0.1, dataset="stl10",
        lr=0.13234838295784523, mask_lr=0.01946841419435407, optimizer="sgd", weight_decay=8.504658547335148e-05,
        temperature=0.2, max_epochs=400, N=6, encoder="resnet18", mask_fbase=128, method="simclr_adios",
        output_dim=256, proj_hidden_dim=2048, unet_norm="gn"),
    "stl10/resnet18/byol_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=1.7193143216139353, batch_size=128, classifier_lr=0.1,
        lr=0.2920279558260822, mask_lr=0.09281403683825379, weight_decay=9.912019840903654e-06, optimizer="sgd",
        max_epochs=400, dataset="stl10", N=6, encoder="resnet18", mask_fbase=64, method="byol_adios",
        output_dim=256, pred_hidden_dim=8192, proj_hidden_dim=4096, unet_norm="gn"),
    "stl10/resnet18/simsiam_adios.sh": dict(
        batch_size=128, dataset="stl10", lr=0.4436168048573669, mask_lr=0.038296424016559166, optimizer="sgd",
        weight_decay=7.227625739330174e-06, alpha_entropy=0.0, alpha_sparsity=1.0, use_both_mask=False,
        use_no_mask=True, use_symmetry_mask=False, max_epochs=400, brightness=0.5521874334305088,
        contrast=0.4775521429505951, hue=0.2, saturation=0.5784474905390056, N=6, encoder="resnet18",
        mask_fbase=32, method="simsiam_adios", output_dim=256, proj_hidden_dim=2048, pred_hidden_dim=512,
        unet_norm="gn", num_blocks=5),
    "stl10/vittiny/simclr_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.39131043617986705, batch_size=128, classifier_lr=0.1, dataset="stl10",
        lr=0.102523479861102, mask_lr=0.0941063568112331, optimizer="sgd", weight_decay=0.0001, temperature=0.2,
        max_epochs=200, N=4, encoder="vit_tiny", mask_fbase=32, method="simclr_adios", output_dim=128,
        proj_hidden_dim=2048, unet_norm="gn"),
    "stl10/vittiny/byol_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.8269158678071891, batch_size=64, classifier_lr=0.1,
        lr=0.44397171059658247, mask_lr=0.20463999909125877, weight_decay=1e-05, optimizer="sgd", max_epochs=200,
        dataset="stl10", N=6, encoder="vit_tiny", mask_fbase=32, method="byol_adios", output_dim=256,
        pred_hidden_dim=8192, proj_hidden_dim=4096, unet_norm="gn"),
    "stl10/vittiny/simsiam_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.8581936366173779, batch_size=128, dataset="stl10",
        lr=0.2917762337709393, mask_lr=0.0931682474492948, max_epochs=200, optimizer="sgd", use_both_mask=False,
        use_no_mask=False, use_symmetry_mask=True, weight_decay=1e-05, brightness=0.4, contrast=0.4, hue=0.1,
        saturation=0.4, N=6, encoder="vit_tiny", mask_fbase=16, method="simsiam_adios", output_dim=2048,
        pred_hidden_dim=512, proj_hidden_dim=2048, unet_norm="gn", num_blocks=4),
    "imagenet100s/resnet18/simclr_adios.sh": dict(
        alpha_entropy=0.711773255433044, alpha_sparsity=0.9229467944410698, batch_size=128, classifier_lr=0.1,
        mask_lr=0.014515024186652984, weight_decay=0.0001, max_epochs=500, dataset="imagenet100s",
        lr=0.11127702230184772, optimizer="sgd", temperature=0.2, brightness=0.8, contrast=0.8, hue=0.2,
        saturation=0.8, N=4, encoder="resnet18", mask_fbase=32, method="simclr_adios", output_dim=128,
        proj_hidden_dim=2048, unet_norm="in"),
    "imagenet100s/resnet18/byol_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.40384562663515944, batch_size=128, lr=0.24140186236916927,
        mask_lr=0.06599301363636853, max_epochs=500, weight_decay=1e-05, optimizer="sgd", dataset="imagenet100s",
        brightness=0.4, contrast=0.4, hue=0.1, saturation=0.2, N=6, encoder="resnet18", mask_fbase=16,
        method="byol_adios", output_dim=256, pred_hidden_dim=8192, proj_hidden_dim=4096, unet_norm="gn"),
    "imagenet100s/resnet18/simsiam_adios.sh": dict(
        alpha_entropy=0.2857646914017864, alpha_sparsity=0.200319625755856, batch_size=128, classifier_lr=0.1,
        dataset="imagenet100s", lr=0.8470842123448166, mask_fbase=16, mask_lr=0.08023435854528733,
        max_epochs=500, optimizer="sgd", use_both_mask=True, use_no_mask=True, use_symmetry_mask=False,
        weight_decay=1e-05, brightness=0.4, contrast=0.4, hue=0.1, saturation=0.4, N=4, encoder="resnet18",
        method="simsiam_adios", output_dim=2048, pred_hidden_dim=512, proj_hidden_dim=2048, unet_norm="gn",
        num_blocks=4),
    "imagenet100s/vittiny/simclr_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.8890717462273039, batch_size=128, dataset="imagenet100s",
        lr=0.11572042971808227, mask_lr=0.03340125573939769, max_epochs=300, optimizer="sgd", temperature=0.2,
        weight_decay=0.0001, brightness=0.8, contrast=0.8, hue=0.2, saturation=0.8, N=6, encoder="vit_tiny",
        mask_fbase=16, method="simclr_adios", output_dim=128, proj_hidden_dim=2048, unet_norm="gn"),
    "imagenet100s/vittiny/byol_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.9517975576926448, batch_size=128, classifier_lr=0.1,
        dataset="imagenet100s", lr=0.21411127909038455, mask_lr=0.32636188418935613, max_epochs=300,
        optimizer="sgd", weight_decay=1e-05, brightness=0.4, contrast=0.4, hue=0.1, saturation=0.2, N=6,
        encoder="vit_tiny", mask_fbase=8, method="byol_adios", output_dim=256, pred_hidden_dim=8192,
        proj_hidden_dim=4096, unet_norm="gn"),
    "imagenet100s/vittiny/simsiam_adios.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.7217629549008437, batch_size=128, classifier_lr=0.1,
        dataset="imagenet100s", lr=0.4968768680935606, mask_lr=0.0665602736669426, optimizer="sgd",
        use_both_mask=True, use_no_mask=False, use_symmetry_mask=False, weight_decay=1e-05, max_epochs=300,
        brightness=0.4, contrast=0.4, hue=0.1, saturation=0.4, N=4, encoder="vit_tiny", mask_fbase=16,
        method="simsiam_adios", output_dim=2048, pred_hidden_dim=512, proj_hidden_dim=2048, unet_norm="gn",
        num_blocks=4),
    "imagenet100/resnet18/simclr_adios_s.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.75, batch_size=128, dataset="imagenet100", temperature=0.2,
        lr=0.18955780763100336, mask_lr=0.4987622134866454, optimizer="sgd", weight_decay=0.0001,
        max_epochs=400, brightness=0.7, contrast=0.6, hue=0.15, saturation=0.8, N=4, encoder="resnet18",
        mask_fbase=8, method="simclr_adios_s", output_dim=128, proj_hidden_dim=2048, unet_norm="gn"),
    "imagenet100/resnet18/byol_adios_s.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=1.0, batch_size=128, dataset="imagenet100", lr=0.8087906078374081,
        mask_lr=0.12952098519347935, max_epochs=400, optimizer="sgd", weight_decay=1e-05, brightness=0.5,
        contrast=0.2, hue=0.05, saturation=0.25, N=6, encoder="resnet18", mask_fbase=32, method="byol_adios_s",
        output_dim=256, pred_hidden_dim=8192, proj_hidden_dim=4096, unet_norm="gn"),
    "imagenet100/resnet18/simsiam_adios_s.sh": dict(
        alpha_entropy=0.0, alpha_sparsity=0.5, batch_size=128, classifier_lr=0.1, dataset="imagenet100",
        lr=0.5424648008289498, mask_lr=0.4846424666121607, optimizer="sgd", use_both_mask=True,
        use_no_mask=True, use_symmetry_mask=True, weight_decay=1e-05, max_epochs=400, brightness=0.4,
        contrast=0.4, hue=0.1, saturation=0.4, N=4, method="simsiam_adios_s", mask_fbase=32, encoder="resnet18",
        output_dim=2048, pred_hidden_dim=512, proj_hidden_dim=2048, unet_norm="gn", num_blocks=4),
}

# ---- the released defaults a script falls back on ---------------------------------------------------
# Shared by every method: src/methods/base.py (BaseModel.add_model_specific_args) and
# src/args/dataset.py (augmentations_args; the released code has no per-dataset colour jitter).
COMMON_DEFAULTS = dict(batch_size=8, lr=0.4, classifier_lr=0.1, weight_decay=1e-5, optimizer="sgd", lars=True,
                       warmup_epochs=10, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
# Per method: the add_model_specific_args of each src/methods/<method>.py. train_mask_epoch comes from
# src/methods/base_adios.py: 0 in BaseADIOSModel (SimCLR, SimSiam), 10 in BaseMomentumADIOSModel (BYOL).
_SIMCLR = dict(output_dim=128, proj_hidden_dim=2048, temperature=0.1, mask_lr=0.1, alpha_sparsity=1.0,
               alpha_entropy=0.0, N=6, mask_fbase=32, unet_norm="gn", train_mask_epoch=0)
_BYOL = dict(output_dim=256, proj_hidden_dim=2048, pred_hidden_dim=512, mask_lr=0.1, N=6, mask_fbase=32,
             alpha_sparsity=1.0, alpha_entropy=0.0, unet_norm="gn", train_mask_epoch=10)
_SIMSIAM = dict(output_dim=128, proj_hidden_dim=2048, pred_hidden_dim=512, mask_lr=0.1, N=6, num_blocks=4,
                mask_fbase=32, alpha_sparsity=1.0, alpha_entropy=0.0, unet_norm="gn", use_symmetry_mask=True,
                use_no_mask=True, use_both_mask=True, train_mask_epoch=0)
RELEASED_DEFAULTS = {
    "simclr_adios": _SIMCLR,
    "simclr_adios_s": {**_SIMCLR, "unet_norm": "no"},   # the single-mask SimCLR defaults to no U-Net norm
    "byol_adios": _BYOL,
    "byol_adios_s": _BYOL,
    "simsiam_adios": _SIMSIAM,
    "simsiam_adios_s": _SIMSIAM,
}
# src/args/utils.py: the image size is fixed by the dataset name (IMG_SIZE_DATASET).
RELEASED_IMG_SIZE = {"stl10": 96, "imagenet100s": 96, "imagenet100": 224}

# How a user asks train.py for the same run: ImageNet100-S is our imagenet100 folder at 96 px.
DATASET_FLAGS = {"stl10": ["--dataset", "stl10"],
                 "imagenet100s": ["--dataset", "imagenet100", "--img_size", "96"],
                 "imagenet100": ["--dataset", "imagenet100", "--img_size", "224"]}
OUR_NORM = {"gn": "gn", "in": "in", "no": "none"}


def released_run(flags):
    """(command-line arguments for train.py, the values the released run used under our names)."""
    method, _, variant = flags["method"].partition("_adios")
    run = {**COMMON_DEFAULTS, **RELEASED_DEFAULTS[flags["method"]], **flags}
    img_size = RELEASED_IMG_SIZE[run["dataset"]]
    assert run["optimizer"] == "sgd" and run["lars"], "every released run is SGD wrapped in LARS"
    expected = dict(
        epochs=run["max_epochs"], batch_size=run["batch_size"], lr=run["lr"], mask_lr=run["mask_lr"],
        weight_decay=run["weight_decay"], alpha=run["alpha_sparsity"], alpha_entropy=run["alpha_entropy"],
        num_masks=run["N"], mask_channels=run["mask_fbase"], mask_norm=OUR_NORM[run["unet_norm"]],
        # SimCLR and BYOL build their U-Net with int(log2(img_size) - 1) blocks; SimSiam reads --num_blocks.
        mask_blocks=run.get("num_blocks", int(math.log2(img_size) - 1)),
        proj_hidden_dim=run["proj_hidden_dim"], pred_hidden_dim=run.get("pred_hidden_dim"),
        proj_output_dim=run["output_dim"],
        jitter=[run["brightness"], run["contrast"], run["saturation"], run["hue"]],
        # Only SimSiam has the extra terms; the other methods must leave them off.
        simsiam_unmasked=run.get("use_no_mask", False),
        simsiam_masked_targets=run.get("use_symmetry_mask", False),
        simsiam_both_masked=run.get("use_both_mask", False),
        single_mask=variant == "_s", optimizer="lars", warmup_epochs=run["warmup_epochs"], img_size=img_size,
        encoder_early_end=run["train_mask_epoch"], classifier_lr=run["classifier_lr"])
    if method == "simclr":
        expected["temperature"] = run["temperature"]    # BYOL and SimSiam have no temperature
    argv = [*DATASET_FLAGS[run["dataset"]], "--method", method, "--arch", run["encoder"], "--dry_run"]
    return argv, expected


def run_id(path):
    """'imagenet100s/vittiny/byol_adios.sh' -> 'imagenet100s-vit_tiny-byol' (ADIOS-s runs end in '_s')."""
    folder, _, script = path.split("/")
    flags = SCRIPTS[path]
    return f"{folder}-{flags['encoder']}-{script.removesuffix('.sh').replace('_adios', '')}"


def mismatches(got, expected):
    """Every key whose resolved value differs from the released one, as readable lines."""
    wrong = []
    for key, want in expected.items():
        if key not in got:
            wrong.append(f"{key}: missing (released {want!r})")
            continue
        have = got[key]
        if isinstance(want, bool) or want is None:
            ok = have is want
        elif isinstance(want, float):
            ok = isinstance(have, (int, float)) and not isinstance(have, bool) and have == pytest.approx(want, rel=1e-9)
        elif isinstance(want, list):
            ok = isinstance(have, (list, tuple)) and list(have) == pytest.approx(want, rel=1e-9)
        else:   # ints and strings: exactly, and of the same type
            ok = type(have) is type(want) and have == want
        if not ok:
            wrong.append(f"{key}: got {have!r}, released {want!r}")
    return wrong


RUNS = sorted(SCRIPTS)


def test_table_covers_the_fifteen_released_runs():
    # five folders (no ImageNet100 ViT), three methods each
    assert len(RUNS) == 15
    assert len({run_id(p) for p in RUNS}) == 15


@pytest.mark.parametrize("path", RUNS, ids=[run_id(p) for p in RUNS])
def test_recipe_matches_released_script(path):
    argv, expected = released_run(SCRIPTS[path])
    got = train.main(argv)
    wrong = mismatches(got, expected)
    assert not wrong, (f"train.py {' '.join(argv)} differs from bash_files/training/{path}:\n  "
                       + "\n  ".join(wrong))


@pytest.mark.parametrize("extra, key, value", [
    (["--alpha", "0.5"], "alpha", 0.5),
    (["--jitter", "0.1", "0.2", "0.3", "0.05"], "jitter", [0.1, 0.2, 0.3, 0.05]),
    (["--epochs", "30"], "epochs", 30),      # BYOL: still above its encoder_early_end of 10
], ids=["alpha", "jitter", "epochs"])
def test_command_line_flag_wins_over_recipe(extra, key, value):
    argv, released = released_run(SCRIPTS["stl10/resnet18/byol_adios.sh"])
    assert released[key] != value                    # the flag really departs from the recipe
    recipe, got = train.main(argv), train.main([*argv, *extra])
    assert not mismatches(got, {key: value})
    # nothing else moves: every other value is still the recipe's (the default folder names a shaping flag)
    assert {k: v for k, v in got.items() if k not in (key, "output_dir")} == {
        k: v for k, v in recipe.items() if k not in (key, "output_dir")}


# ---- the defaults, the demo's and the recipes', as train.py resolves them ----

def test_each_kind_of_run_gets_its_own_default_folder():
    # So that `python train.py --dataset cifar10` after the quickstart starts a new run instead of being
    # refused, and a baseline never resumes the ADIOS run's checkpoint.
    folder = lambda *flags: train.main([*flags, "--dry_run"])["output_dir"]    # noqa: E731
    assert folder() == os.path.join("runs", "shapes_simclr_resnet18")
    assert folder("--dataset", "cifar10", "--method", "byol") == os.path.join("runs", "cifar10_byol_resnet18")
    assert folder("--num_masks", "0") == os.path.join("runs", "shapes_simclr_resnet18_base")
    assert folder("--mask_type", "block", "--seed", "1") == os.path.join("runs", "shapes_simclr_resnet18_block_seed1")
    assert folder("--dataset", "imagenet100", "--img_size", "96", "--single_mask") == \
        os.path.join("runs", "imagenet100-96px_simclr_resnet18_adios-s")
    assert folder("--output_dir", "elsewhere") == "elsewhere"


def test_recipe_fills_what_is_not_given():
    args = train.main(["--dataset", "stl10", "--method", "byol", "--alpha", "0.5", "--dry_run"])
    assert (args["lr"], args["mask_lr"], args["num_masks"], args["mask_channels"]) == \
        (0.2920279558260822, 0.09281403683825379, 6, 64)      # the released run's values (test_recipes.py: all 15)
    assert args["alpha"] == 0.5 and args["optimizer"] == "lars" and args["img_size"] == 96
    args = train.main(["--dataset", "imagenet100", "--img_size", "224", "--dry_run"])
    assert args["single_mask"] and args["mask_channels"] == 8


def test_default_workers_share_the_cores_among_local_processes(monkeypatch):
    monkeypatch.setattr(recipes.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert recipes.default_workers("cuda") == 16            # one GPU on a 16-core host: every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")           # torchrun --nproc_per_node=4
    assert recipes.default_workers("cuda") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert recipes.default_workers("cuda") == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert recipes.default_workers("cpu") == 1              # training on the CPU: the cores compute, one worker loads
    monkeypatch.setattr(recipes.torch.cuda, "is_available", lambda: False)
    assert recipes.default_workers(None) == 1               # no --device and no GPU: the CPU
    assert train.main([*TINY[:4], "--dry_run"])["workers"] == 1    # what --workers means when not given


def test_the_demo_defaults_are_the_cpu_demo_only():
    """shapes without a recipe gets SHAPES_DEFAULTS (N = 2, 14 epochs, α = 0.5) in its plain default folder; a
    flag given wins and names the folder; a dataset with a released recipe never sees them."""
    demo = train.main(["--dry_run"])
    assert (demo["num_masks"], demo["epochs"], demo["batch_size"], demo["alpha"]) == (2, 14, 64, 0.5)
    assert demo["output_dir"] == os.path.join("runs", "shapes_simclr_resnet18")
    given = train.main(["--num_masks", "4", "--epochs", "6", "--dry_run"])
    assert (given["num_masks"], given["epochs"]) == (4, 6)
    assert given["output_dir"] == os.path.join("runs", "shapes_simclr_resnet18_num_masks4")   # epochs: running
    cifar = train.main(["--dataset", "cifar10", "--dry_run"])
    assert (cifar["num_masks"], cifar["epochs"], cifar["alpha"]) == \
        (recipes.DEFAULTS["num_masks"], recipes.DEFAULTS["epochs"], recipes.DEFAULTS["alpha"])


def folder(*flags):
    return train.main([*flags, "--dry_run"])["output_dir"]


def test_default_folder_tells_configurations_apart():
    assert folder() == os.path.join("runs", "shapes_simclr_resnet18")
    assert folder("--alpha", "0.7") == os.path.join("runs", "shapes_simclr_resnet18_alpha0.7")
    assert folder("--alpha", "0.7", "--lr", "1.0") == os.path.join("runs", "shapes_simclr_resnet18_alpha0.7_lr1.0")
    assert folder("--alpha", "0.5", "--batch_size", "64") == folder()               # the demo's own values
    assert folder("--dataset", "stl10", "--batch_size", "128") == os.path.join("runs", "stl10_simclr_resnet18_batch128")
    many = folder("--alpha", "0.7", "--lr", "1.0", "--mask_lr", "0.1", "--temperature", "0.3", "--weight_decay", "0")
    assert many.startswith(os.path.join("runs", "shapes_simclr_resnet18_flags-")) and len(many) < 50
    assert many != folder("--alpha", "0.7", "--lr", "1.0", "--mask_lr", "0.1", "--temperature", "0.3")


def test_the_recipe_batch_is_the_global_batch(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")            # torchrun's, read before any process group exists
    assert recipes.parse_args(["--dataset", "stl10"]).batch_size == 64                 # 256 / 4
    assert recipes.parse_args(["--dataset", "stl10", "--batch_size", "32"]).batch_size == 32    # given: per process
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:
        recipes.parse_args(["--dataset", "stl10"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "global batch 256 does not divide among 3" in err
