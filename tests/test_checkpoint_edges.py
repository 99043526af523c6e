"""Runs that hold at the edges (checkpoint.py, train.py's end of epoch): every change of --precision resumes,
every shaping flag is refused on resume and every running flag is not, a stop saves before it evaluates, a full
disk while writing the epoch's log or picture ends in one line with the checkpoint intact, another process
count is refused where per-process draws differ, and any seed torch can take works. CPU, helpers.TINY."""
import argparse
import errno
import os
import shutil
import signal

import pytest
import torch

import checkpoint
import monitor
import train
from helpers import bad_input, ckpt, parsed, read_log, run

PRECISIONS = ("fp32", "bf16", "fp16")


@pytest.fixture(scope="module")
def first_steps(tmp_path_factory):
    """{precision: a run folder after one step in that precision}."""
    root = tmp_path_factory.mktemp("precision")
    for p in PRECISIONS:
        run(root / p, "--max_steps", "1", "--precision", p)
    return root


@pytest.mark.parametrize("made, now", [(a, b) for a in PRECISIONS for b in PRECISIONS if a != b])
def test_every_change_of_precision_resumes(first_steps, tmp_path, capsys, made, now):
    shutil.copytree(first_steps / made, tmp_path / "out")
    capsys.readouterr()
    assert run(tmp_path / "out", "--max_steps", "2", "--precision", now)["step"] == 2
    said = capsys.readouterr().out
    assert f"--precision {now} on this machine (it was {made})" in said
    assert ("the checkpoint has no loss scale: it starts fresh" in said) == (now == "fp16")
    state = ckpt(tmp_path / "out")
    assert state["step"] == 2 and bool(state["scaler"]) == (now == "fp16")     # fp16's scale is saved


def test_fp16_keeps_its_loss_scale_on_resume(first_steps, tmp_path):
    shutil.copytree(first_steps / "fp16", tmp_path / "out")
    saved = ckpt(tmp_path / "out")["scaler"]
    scaler = torch.amp.GradScaler("cpu")
    assert checkpoint.load_scaler(scaler, saved) is None and scaler.get_scale() == saved["scale"]


# ---- resume refusals, flag by flag ----

def changed(value):
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, (list, tuple)):
        return [v * 0.5 for v in value]
    return f"not-{value}"


# Written out here, not read from checkpoint.py: a flag moved from one list to the other by mistake must fail.
SHAPING = ("dataset", "num_images", "data_version", "img_size", "jitter", "gpu_aug", "arch", "stem", "method",
           "proj_hidden_dim", "pred_hidden_dim", "proj_output_dim", "temperature", "simsiam_unmasked",
           "simsiam_masked_targets", "simsiam_both_masked", "no_gather", "num_masks", "single_mask", "alpha",
           "alpha_entropy", "mask_lr", "mask_channels", "mask_norm", "mask_blocks", "mask_type", "batch_size", "lr",
           "weight_decay", "optimizer", "warmup_epochs", "encoder_early_end", "classifier_lr", "sync_bn", "seed")
RUNNING = ("epochs", "max_steps", "save_every", "resume", "dry_run", "data_dir", "download", "workers", "device",
           "output_dir", "compile", "collective_timeout", "log_every", "tensorboard", "precision", "channels_last")


def test_the_two_lists_are_checkpoint_pys():
    assert set(SHAPING) == set(checkpoint.SHAPING) and set(RUNNING) == set(checkpoint.RUNNING + checkpoint.DEVICE)


@pytest.mark.parametrize("flag", SHAPING)
def test_each_shaping_flag_changed_alone_is_refused_naming_it(first_steps, flag):
    path = first_steps / "fp32" / "checkpoint.pth"
    now = {**vars(parsed("--max_steps", "2")), "world_size": 1}             # as train.main completes them
    now[flag] = changed(now[flag])
    state, problem = checkpoint.load_for_resume(path, argparse.Namespace(**now))
    said = "global batch" if flag == "batch_size" else f"--{flag} "
    assert state is None and said in problem and problem.count("(this run:") == 1, problem


@pytest.mark.parametrize("flag", RUNNING)
def test_each_running_flag_changed_alone_resumes(first_steps, flag):
    path = first_steps / "fp32" / "checkpoint.pth"
    now = {**vars(parsed("--max_steps", "2")), "world_size": 1}
    now[flag] = changed(now[flag]) if now[flag] is not None else 1
    state, problem = checkpoint.load_for_resume(path, argparse.Namespace(**now))
    assert problem is None and state["step"] == 1


@pytest.mark.parametrize("made, says", [
    (dict(single_mask=True), "without --single_mask"),
    (dict(mask_type="random", num_masks=1), "--mask_type random draws its masks per process"),
    (dict(mask_type="block", num_masks=1), "--mask_type block draws its masks per process"),
    (dict(single_mask=True, num_masks=0), None),            # no masks: ADIOS-s draws nothing
    (dict(alpha_entropy=0.5), None)])                         # α₂ trains the same over any count
def test_another_process_count_where_draws_are_per_process(first_steps, made, says):
    args = {**ckpt(first_steps / "fp32")["args"], **made}
    found = checkpoint.shaping_differences({**args, "world_size": 2, "batch_size": 4}, args)
    assert found == [] if says is None else len(found) == 1 and says in found[0], found


# ---- a stop saves first; the epoch's writes on a full disk ----

def test_the_checkpoint_is_written_before_the_evaluation(tmp_path, monkeypatch):
    out, seen, real = tmp_path / "out", [], monitor.probe_top1

    def slow_probe(*args):                    # the held-out evaluation: the epoch's checkpoint is already there
        seen.append(ckpt(out)["step"])
        return real(*args)
    monkeypatch.setattr(monitor, "probe_top1", slow_probe)
    run(out, "--epochs", "2")
    assert seen == [4, 8]


def test_a_stop_saves_and_skips_the_evaluation(tmp_path, monkeypatch, capsys):
    out, calls, real = tmp_path / "out", [], train.adios_step

    def signalled(*args):                     # SIGTERM during the second step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(train, "adios_step", signalled)
    monkeypatch.setattr(monitor, "probe_top1", lambda *a: pytest.fail("a stop must not evaluate"))
    monkeypatch.setattr(monitor, "save_mask_picture", lambda *a: pytest.fail("a stop must not draw"))
    log = run(out, "--epochs", "2")
    assert log["step"] == ckpt(out)["step"] == 2 and ckpt(out)["epoch"] == 0
    (line,) = read_log(out)
    assert line["evaluation"].startswith("skipped") and "online_top1" not in line
    assert "stopped: evaluation skipped" in capsys.readouterr().out
    monkeypatch.undo()
    assert run(out, "--epochs", "1")["step"] == 4               # the next run finishes the epoch and evaluates
    assert "online_top1" in read_log(out)[-1]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("what", ["picture", "log"])
def test_a_full_disk_while_writing_the_epoch_ends_in_one_line(tmp_path, monkeypatch, capsys, what):
    out = tmp_path / "out"
    if what == "picture":
        monkeypatch.setattr(monitor, "save_image", no_space)
    else:
        real_open = open
        monkeypatch.setattr(monitor, "open", lambda path, *a, **k: no_space() if str(path).endswith("log.jsonl")
                            else real_open(path, *a, **k), raising=False)
    with pytest.raises(SystemExit) as e:
        run(out, "--epochs", "1")
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("train.py:")]    # beside tqdm's progress bar
    assert e.value.code == 1 and len(said) == 1 and "Traceback" not in err, err   # as a failed save
    assert said[0].startswith("train.py: error: cannot write") and "No space left" in said[0] and "intact" in said[0]
    assert ckpt(out)["step"] == 4 and ckpt(out)["epoch"] == 1            # the epoch's checkpoint, whole


# ---- seeds ----

def test_a_large_seed_works(tmp_path):
    seed = 10 ** 15                                           # the per-step seed far past 2^64 before it wraps
    assert train.step_seed(seed, 3, 1) < 2 ** 64
    assert run(tmp_path / "out", "--max_steps", "2", "--seed", str(seed))["step"] == 2


@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
def test_a_seed_torch_cannot_take_is_refused_in_one_line(capsys, tmp_path, seed):
    assert f"--seed {seed}: must be from 0 to 2^63" in bad_input(capsys, tmp_path, "--seed", seed)


def test_seeds_that_worked_before_are_unchanged():
    assert train.step_seed(7, 5, 1) == (7 * 1_000_003 + 1) * 100_000_007 + 5

