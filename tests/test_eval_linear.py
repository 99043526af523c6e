"""Tests of eval_linear.py: the linear probe, kNN, the test splits it scores on, and --precise_bn.

CPU only, no network: the data is the synthetic shapes set, the checkpoints are built here.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import eval_linear
from adios import ADIOS
from encoders import build_encoder
from eval_linear import Standardize, cached_linear_probe, knn_top1
from masker import Masker
from optim import LARS

TINY = ["--dataset", "shapes", "--num_images", "256", "--epochs", "3", "--workers", "0",
        "--device", "cpu", "--knn", "--mask_images", "32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, torch's threads spin-wait on each other (~40× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it: an untrained ResNet18 (32 px, standard stem) and masker."""
    torch.manual_seed(0)
    encoder, feat_dim = build_encoder("resnet18", 32, stem="standard")
    with torch.no_grad():                                     # non-trivial BN statistics to preserve
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    model = ADIOS(encoder, feat_dim, masker=Masker(3, 32, 8, "gn"), proj_hidden_dim=32, proj_output_dim=16)
    args = dict(dataset="shapes", arch="resnet18", img_size=32, stem="standard", num_masks=3,
                mask_channels=8, mask_norm="gn", mask_type="adios", method="simclr", data_dir="data")
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    torch.save(dict(model=model.state_dict(), encoder=encoder.state_dict(), optimizers={}, scaler=None,
                    epoch=7, args=args), path)
    return path


# ---- eval_linear.main ------------------------------------------------------------------------

def test_eval_writes_json_and_keeps_encoder_identical(fake_checkpoint, monkeypatch):
    built = []
    real = eval_linear.frozen_encoder
    monkeypatch.setattr(eval_linear, "frozen_encoder", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    results = eval_linear.main(["--ckpt", str(fake_checkpoint), *TINY])

    out = fake_checkpoint.parent / "eval_shapes.json"
    saved = json.loads(out.read_text())
    assert saved == results
    assert saved["protocol"] == "cached-features" and saved["img_size"] == 32 and saved["epoch"] == 7
    assert 0 <= saved["top1"] <= 100 and saved["top5"] is None          # 4 classes: no top-5
    assert 0 <= saved["knn_top1"] <= 100
    assert set(saved["mask_quality"]) == {"ari", "ari_fg", "miou"}
    assert 0 <= saved["mask_quality"]["miou"] <= 1
    assert saved["train_images"] == 256 and saved["test_images"] == 64
    assert "--ckpt" in saved["command"] and saved["checkpoint"] == str(fake_checkpoint)

    # The evaluated encoder is bit-identical to the checkpoint's, BatchNorm statistics included.
    before = torch.load(fake_checkpoint, weights_only=True)["encoder"]
    after = built[0][0].state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_random_init(tmp_path, monkeypatch):
    optimizers = []                                           # the probe's optimiser, each run
    real = eval_linear.probe_optimizer
    monkeypatch.setattr(eval_linear, "probe_optimizer", lambda *a: optimizers.append(real(*a)) or optimizers[-1])
    results = eval_linear.main(["--random_init", "--arch", "resnet18", "--img_size", "32", "--stem",
                                "standard", "--output_dir", str(tmp_path), *TINY[:-2], "--epochs", "2"])
    assert results["checkpoint"] is None and results["mask_quality"] is None
    assert json.loads((tmp_path / "eval_shapes.json").read_text())["top1"] == results["top1"]
    assert results["optimizer"] == "sgd" and type(optimizers[-1]) is torch.optim.SGD
    assert len(results["probe_losses"]) == 2 and results["test_dirs"] is None
    results = eval_linear.main(["--random_init", "--arch", "resnet18", "--stem", "standard", "--output_dir",
                                str(tmp_path), *TINY[:-2], "--epochs", "1", "--augment", "--bn_head"])
    assert results["protocol"] == "augmented" and results["bn_head"] and results["knn_top1"] is not None
    assert results["optimizer"] == "lars" and isinstance(optimizers[-1], LARS)   # the released probe
    assert (tmp_path / "eval_shapes_augmented.json").exists()


def test_user_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        eval_linear.main(["--ckpt", str(tmp_path / "nope.pth"), "--dataset", "shapes"])
    assert e.value.code == 2 and "--ckpt" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        eval_linear.main(["--ckpt", str(tmp_path / "junk.pth"), "--dataset", "shapes"])
    assert e.value.code == 2 and "--ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                     # DataError: CIFAR10 is not there (no download)
        eval_linear.main(["--random_init", "--arch", "resnet18", "--dataset", "cifar10",
                          "--data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "cifar10" in err
    with pytest.raises(SystemExit) as e:
        eval_linear.main(["--dataset", "shapes"])           # neither --ckpt nor --random_init
    assert e.value.code == 2


# ---- the probe's optimisation --------------------------------------------------------------------

def test_augmented_probe_optimizer_is_the_released_lars():
    head = torch.nn.Linear(8, 3)
    opt = eval_linear.probe_optimizer(head, 0.1, lars=True)
    weights, biases = opt.param_groups
    assert isinstance(opt, LARS) and weights["params"] == [head.weight] and biases["params"] == [head.bias]
    for group in (weights, biases):
        assert group["lr"] == 0.1 and group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert weights["lars"] and weights["eta"] == 1e-3 and weights["clip"] is False
    assert not biases["lars"]                                 # the bias: plain SGD
    plain = eval_linear.probe_optimizer(head, 0.1, lars=False)
    assert type(plain) is torch.optim.SGD and plain.defaults["momentum"] == 0.9 and plain.defaults["weight_decay"] == 0


def test_probe_lr_drops_at_epochs_60_and_80(monkeypatch):
    optimizers, rates = [], []
    real = eval_linear.probe_optimizer
    monkeypatch.setattr(eval_linear, "probe_optimizer", lambda *a: optimizers.append(real(*a)) or optimizers[-1])
    feats, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

    def epoch_batches():                                      # one batch an epoch; notes the rate it is trained at
        rates.append([group["lr"] for group in optimizers[0].param_groups])
        yield feats, labels

    head = eval_linear.train_linear_head(4, 3, 100, 0.1, epoch_batches, torch.device("cpu"), lars=True)
    assert len(head.epoch_losses) == 100
    assert [[round(r, 9) for r in rates[e]] for e in (0, 59, 60, 79, 80, 99)] == \
        [[0.1, 0.1], [0.1, 0.1], [0.01, 0.01], [0.01, 0.01], [0.001, 0.001], [0.001, 0.001]]


def realistic_features(n, seed, D=512, C=4):
    """Features like a trained ResNet's: (n, D) non-negative, norms ~40, ~0.96 cosine-similar to each other
    (a shared mean and one shared factor that moves every dimension together, like brightness), and
    classes (n,) linearly separable along small class directions. The feature space is the same for every
    seed; the seed draws the samples."""
    g = torch.Generator().manual_seed(0)
    mean, shared = torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g)                 # (D,) each
    class_dirs = torch.randn(C, D, generator=g)                                                  # (C, D)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    factor, noise = torch.randn(n, 1, generator=g), torch.randn(n, D, generator=g)
    x = (mean + 0.5 * factor * shared + 0.04 * class_dirs[labels] + 0.1 * noise).clamp(min=0)   # (n, D), post-ReLU
    return x * 40 / x.norm(dim=1).mean(), labels


def test_cached_probe_is_well_conditioned():
    # Raw, these features made SGD at lr 0.1 start at loss ~58 and end at 55 % test accuracy; standardised
    # per dimension only, the shared factor's direction (variance ~370) kept the loss above chance for
    # two epochs. The fast default probe must learn at once.
    train, labels = realistic_features(400, seed=1)
    test, test_labels = realistic_features(400, seed=2)
    assert train.norm(dim=1).mean() == pytest.approx(40) and train.shape == (400, 512)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = eval_linear.cached_linear_probe(train, labels, 4, 10, 0.1, 128, gen)
    chance = math.log(4)
    losses = head.epoch_losses
    assert all(math.isfinite(v) for v in losses) and max(losses) < 2 * chance and losses[1] < chance
    assert losses[-1] < 0.1
    with torch.no_grad():
        assert eval_linear.topk_accuracy(head(test), test_labels, 1) >= 95


def test_standardize_is_one_fixed_affine_map():
    train, _ = realistic_features(400, seed=1)
    standardize = eval_linear.Standardize(train)
    z = standardize(train)                                    # (400, 512)
    assert z.mean(dim=0).abs().max() < 1e-4
    variances = torch.linalg.eigvalsh(z.T.double() @ z.double() / 399)
    assert variances.max() < 1 + 1e-4                         # no direction above the average variance
    plain = (train - train.mean(0)) / train.std(0)            # per dimension only
    plain_variances = torch.linalg.eigvalsh(plain.T.double() @ plain.double() / 399)
    assert plain_variances.max() > 300                        # the shared factor
    below = plain_variances < 0.99                            # directions under 1 are left as they were
    torch.testing.assert_close(variances[below], plain_variances[below], rtol=1e-3, atol=1e-6)
    # Test features get the train split's map, whatever their own statistics: an affine map.
    test, _ = realistic_features(50, seed=2)
    a, b = test[:25], test[25:] * 3 + 1
    torch.testing.assert_close(standardize(0.3 * a + 0.7 * b), 0.3 * standardize(a) + 0.7 * standardize(b),
                               rtol=0, atol=1e-4)
    dead = train.clone()
    dead[:, 7] = 0                                            # a unit never active on the train split
    alive = test.clone()
    alive[:, 7] = 5.0
    assert torch.isfinite(eval_linear.Standardize(dead)(alive)).all()


# ---- more test folders: robustness and transfer (--test_dirs) ---------------------------------------

COLOURS = {"00_red": (200, 30, 30), "01_green": (30, 200, 30), "02_blue": (30, 30, 200)}


def _images(folder, colour, count, seed):
    """count 32-px images of one colour, a little noise each, written as PNGs into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(np.array(colour) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{seed}_{i}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A training folder (train/ and val/ hold the same images) and three test folders:
    same/val/<class>: the training images again; swapped/val/<class>: each class's images filed under the
    next class; flat/<class>: the flat layout, two of the three classes."""
    root = tmp_path_factory.mktemp("folders")
    names = list(COLOURS)
    for k, name in enumerate(names):
        for split in ("train", "val"):
            _images(root / "in9" / split / name, COLOURS[name], 4, seed=k)
        _images(root / "same" / "val" / name, COLOURS[name], 4, seed=k)
        _images(root / "swapped" / "val" / names[(k + 1) % 3], COLOURS[name], 3, seed=10 + k)
    for name in ("00_red", "02_blue"):
        _images(root / "flat" / name, COLOURS[name], 2, seed=20)
    return root


def test_test_dirs_report_each_folder(folders, tmp_path):
    tests = [str(folders / "same"), str(folders / "swapped"), str(folders / "flat")]
    results = eval_linear.main(["--random_init", "--arch", "resnet18", "--img_size", "32", "--stem", "standard",
                                "--dataset", "imagefolder", "--data_dir", str(folders / "in9"), "--test_dirs", *tests,
                                "--epochs", "20", "--knn", "--workers", "0", "--device", "cpu",
                                "--output", str(tmp_path / "in9.json")])
    assert json.loads((tmp_path / "in9.json").read_text()) == results
    assert results["train_images"] == results["test_images"] == 12 and results["num_classes"] == 3
    assert list(results["test_dirs"]) == tests
    same, swapped, flat = (results["test_dirs"][t] for t in tests)
    assert (same["images"], swapped["images"], flat["images"]) == (12, 9, 4)
    assert set(same) == {"images", "top1", "top5", "knn_top1"} and same["top5"] is None   # 3 classes: no top-5
    # val/ holds the training images: so does `same`, scored alike; `swapped` files every image under the
    # wrong class, so a probe right on the training images is wrong on every one of them.
    assert results["top1"] == same["top1"] == 100.0 and results["knn_top1"] == same["knn_top1"] == 100.0
    assert swapped["top1"] == swapped["knn_top1"] == 0.0
    assert flat["top1"] == 100.0                              # labels by class name: red 0 and blue 2


def test_test_dirs_mistakes_are_one_line(folders, tmp_path, capsys):
    _images(tmp_path / "odd" / "val" / "03_yellow", (200, 200, 30), 1, seed=0)
    common = ["--random_init", "--arch", "resnet18", "--img_size", "32", "--stem", "standard", "--epochs", "1",
              "--workers", "0", "--device", "cpu", "--output_dir", str(tmp_path)]
    for extra, expected in (
            (["--dataset", "imagefolder", "--data_dir", str(folders / "in9"), "--test_dirs", str(tmp_path / "odd")],
             ["--test_dirs " + str(tmp_path / "odd"), "03_yellow", "name its class folders as the training folder's"]),
            (["--dataset", "shapes", "--test_dirs", str(folders / "same")], ["--test_dirs", "--dataset imagefolder"]),
            (["--dataset", "imagefolder", "--data_dir", str(folders / "in9"), "--test_dirs", str(folders / "same"),
              str(folders / "same")], ["named twice"]),
            (["--dataset", "imagefolder", "--data_dir", str(folders / "in9"), "--test_dirs", str(tmp_path / "nope")],
             ["does not exist"])):
        with pytest.raises(SystemExit) as e:
            eval_linear.main(common + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert all(text in err for text in expected), err


def test_knn_finds_the_nearest_class():
    g = torch.Generator().manual_seed(0)
    train = torch.eye(3).repeat(10, 1) + 0.01 * torch.randn(30, 3, generator=g)      # three tight clusters
    labels = torch.arange(3).repeat(10)
    test = torch.eye(3) * 5                                   # the scale must not matter: cosine
    assert knn_top1(train, labels, test, torch.arange(3), num_classes=3) == 100.0


def test_knn_votes_are_weighted_by_similarity():
    # k = 5 neighbours of the query (1, 0): two almost identical ones of class 0 (cos ≈ 0.999) and three
    # farther ones of class 1 (cos ≈ 0.7). Counting votes picks class 1; weights exp(sim / T) pick class 0.
    bank = torch.tensor([[1, 0.05], [1, -0.05], [1, 1.0], [1, 1.1], [1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert knn_top1(bank, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), num_classes=2, k=5) == 100.0


# ---- the fast probe standardises with the train split's statistics only ---------------------------

def test_probe_standardisation_is_fitted_on_train_and_applied_unchanged():
    g = torch.Generator().manual_seed(0)
    train_feats = torch.randn(200, 6, generator=g) * torch.arange(1.0, 7.0) + 3            # (n, D)
    train_labels = torch.randint(3, (200,), generator=g)
    test_feats = torch.randn(40, 6, generator=g) * 5 - 2                  # other statistics than train's
    head = cached_linear_probe(train_feats, train_labels, 3, 1, 0.1, 64, torch.Generator().manual_seed(0))
    standardize = head[0]
    assert isinstance(standardize, Standardize)
    torch.testing.assert_close(standardize.mean, train_feats.mean(0))             # the train split's
    reference = Standardize(train_feats)
    torch.testing.assert_close(standardize.matrix, reference.matrix)
    with torch.no_grad():
        whole = standardize(test_feats)
        torch.testing.assert_close(whole[:5], standardize(test_feats[:5]), rtol=0, atol=1e-5)
        torch.testing.assert_close(whole[7:8], standardize(test_feats[7:8]), rtol=0, atol=1e-5)
        torch.testing.assert_close(whole, (test_feats - train_feats.mean(0)) @ reference.matrix)
        torch.testing.assert_close(head(test_feats[:5]), head(test_feats)[:5], rtol=0, atol=1e-5)


# ---- the probe trains on the train split and is scored on the test split ----------------------------

def test_linear_probe_and_knn_are_scored_on_the_test_split(monkeypatch, tmp_path):
    # eval_linear.main: the probe trains on (and kNN searches) the train split's features and both are
    # scored on the test split's: a swap would report accuracy on training images without a word.
    source, scored = {}, []
    real_extract, real_accuracies = eval_linear.extract_features, eval_linear.accuracies

    def extract(encoder, dataset, *args, **kwargs):
        feats, labels = real_extract(encoder, dataset, *args, **kwargs)
        source[id(feats)] = dataset.split                         # shapes: "train" or "test"
        return feats, labels

    def accuracies(head, bank, feats, *args, **kwargs):
        scored.append((source[id(feats)], source[id(bank[0])]))
        return real_accuracies(head, bank, feats, *args, **kwargs)

    monkeypatch.setattr(eval_linear, "extract_features", extract)
    monkeypatch.setattr(eval_linear, "accuracies", accuracies)
    trained = []
    real_probe = eval_linear.cached_linear_probe
    monkeypatch.setattr(eval_linear, "cached_linear_probe",
                        lambda feats, *a, **k: trained.append(source[id(feats)]) or real_probe(feats, *a, **k))
    eval_linear.main(["--random_init", "--arch", "resnet18", "--img_size", "32", "--stem", "standard", "--dataset",
                      "shapes", "--num_images", "32", "--epochs", "1", "--knn", "--workers", "0", "--device", "cpu",
                      "--output", str(tmp_path / "eval.json")])
    assert trained == ["train"] and scored == [("test", "train")]


# ---- eval_linear.py --precise_bn ---------------------------------------------------------------------

def test_eval_linear_precise_bn_flag(tmp_path, capsys):
    run = ["--random_init", "--arch", "resnet18", "--img_size", "32", "--stem", "standard", "--dataset", "shapes",
           "--num_images", "64", "--epochs", "1", "--workers", "0", "--device", "cpu", "--batch_size", "16",
           "--mask_images", "0", "--output_dir", str(tmp_path)]
    assert eval_linear.get_args_parser().parse_args(run).precise_bn == 0            # off by default
    results = eval_linear.main([*run, "--precise_bn", "2"])
    assert results["precise_bn"] == 2 and "over 32 clean training images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        eval_linear.main([*run, "--precise_bn", "-1"])
    assert exit_.value.code == 2 and "--precise_bn -1" in capsys.readouterr().err
