"""Tests of supervised.py, the supervised ceiling of README's "Evidence on shapes": what it trains on, with
what, and that eval_linear.py scores its checkpoint like any other. CPU only, tiny shapes runs."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import eval_linear
import recipes
import supervised

TINY = ["--num_images", "64", "--epochs", "2", "--batch_size", "16", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run, recording every cross-entropy call's targets and the loader's labels beside them."""
    out = tmp_path_factory.mktemp("supervised")
    targets, loader_labels, real_ce = [], [], F.cross_entropy
    real_iter = torch.utils.data.DataLoader.__iter__

    def recording_ce(logits, y, *args, **kwargs):
        targets.append(y.clone())
        return real_ce(logits, y, *args, **kwargs)

    def recording_iter(loader):
        for batch in real_iter(loader):
            if isinstance(batch[0], (list, tuple)):                 # the training loader's ((x_a, x_b), labels)
                loader_labels.append(batch[1].clone())
            yield batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(supervised.F, "cross_entropy", recording_ce)
        mp.setattr(torch.utils.data.DataLoader, "__iter__", recording_iter)
        log = supervised.main(TINY + ["--output_dir", str(out)])
    return dict(out=out, log=log, targets=targets, loader_labels=loader_labels)


def test_trains_on_both_views_labels(run):
    """Every step's targets are its batch's labels, once for view a and once for view b (2 epochs × 4 steps)."""
    assert len(run["targets"]) == len(run["loader_labels"]) == 8
    for y, labels in zip(run["targets"], run["loader_labels"]):
        assert torch.equal(y, labels.repeat(2))


def test_checkpoint_is_scored_like_any_other(run):
    """eval_linear reads the checkpoint's encoder and args; no masker is rebuilt from it."""
    ckpt = eval_linear.load_checkpoint(os.path.join(run["out"], "checkpoint.pth"))
    assert ckpt["args"]["method"] == "supervised" and ckpt["args"]["optimizer"] == "adamw"
    encoder, feat_dim = eval_linear.frozen_encoder(ckpt["args"]["arch"], ckpt["args"]["img_size"],
                                                   ckpt["args"]["stem"], ckpt["encoder"])
    assert feat_dim == 512 and checkpoint.learned_masker(ckpt) is None
    logs = [json.loads(line) for line in open(os.path.join(run["out"], "log.jsonl"))]
    assert [entry["epoch"] for entry in logs] == [0, 1] and 0 <= logs[-1]["test_top1"] <= 100


def test_the_demo_budget_and_folder():
    """Without flags: train.py's demo settings (epochs, batch, views), AdamW at 1e-3, its own folder."""
    args, ssl = supervised.parse_args([]), recipes.parse_args([])
    assert (args.epochs, args.batch_size, args.img_size, args.stem, args.jitter) == \
        (ssl.epochs, ssl.batch_size, ssl.img_size, ssl.stem, ssl.jitter)
    assert (args.optimizer, args.lr, args.weight_decay) == ("adamw", 1e-3, 0.05)
    assert args.output_dir == os.path.join("runs", "shapes_supervised_resnet18")
    assert supervised.parse_args(["--seed", "1", "--lr", "0.01"]).output_dir.endswith("_seed1")


def test_optimizer_flag_refused(capsys):
    with pytest.raises(SystemExit) as e:
        supervised.parse_args(["--optimizer", "lars"])
    assert e.value.code == 2 and "--optimizer" in capsys.readouterr().err
