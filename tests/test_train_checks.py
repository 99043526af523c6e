"""Tests of the training step made ready for a GPU, on the CPU: the host reads the step statistics only
every --log_every steps and at an epoch's end (train.py:train_one_epoch), a NaN between two reads still
stops the run before anything is saved, a stop signal still saves, inputs come in the model's memory
format. (The stats stay on the device: test_adios.py; the synchronised per-slot BatchNorm's autograd, which
keeps no float32 copy of bf16 activations: test_batchnorm.py.)
"""
import os
import signal

import pytest
import torch

import adios
import recipes
import train
from helpers import TINY, read_log

# ---- host syncs: counted where Python turns a tensor into a number ---------------------------------

# Every way Python code makes the host wait for a tensor's value (on a GPU: a device synchronisation).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.fixture
def count_reads(monkeypatch):
    """A dict whose "n" counts the tensor reads made while "on" is True."""
    counter = dict(n=0, on=False)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            counter["n"] += counter["on"]
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def per_iteration_reads(monkeypatch, counter, tmp_path, *flags):
    """Run train.py on TINY (4 steps an epoch) and return, per epoch, the reads made from the epoch's
    start to each step's start and to the epoch's end, as differences: one number per iteration. Also the
    memory formats of the inputs adios_step received."""
    epochs, formats = [], []
    real_epoch, real_step = train.train_one_epoch, train.adios_step

    def epoch(*args, **kwargs):
        marks, counter["on"] = [0], True
        epochs.append(marks)
        counter["n"] = 0
        try:
            return real_epoch(*args, **kwargs)
        finally:
            marks.append(counter["n"])
            counter["on"] = False

    def step(model, x_a, x_b, *rest):
        epochs[-1].append(counter["n"])
        formats.append(x_a.is_contiguous(memory_format=torch.channels_last) and x_a.dim() == 4)
        return real_step(model, x_a, x_b, *rest)

    def uncounted(real):
        # Views are made on the CPU (in worker processes on a GPU run; here, with --workers 0, in this
        # one), and each epoch's order too: these reads of CPU random numbers make no device wait.
        def call(self):
            on, counter["on"] = counter["on"], False
            try:
                return real(self)
            finally:
                counter["on"] = on
        return call


    monkeypatch.setattr(train, "train_one_epoch", epoch)
    monkeypatch.setattr(train, "adios_step", step)
    for cls, name in ((torch.utils.data.dataloader._BaseDataLoaderIter, "__next__"), (torch.utils.data.DataLoader,
                                                                                      "__iter__")):
        monkeypatch.setattr(cls, name, uncounted(getattr(cls, name)))
    train.main([*TINY, "--output_dir", str(tmp_path / "out"), *flags])
    # marks: [0, before step 1, ..., before step 4, end]; iteration i runs from mark i+1 to mark i+2.
    return [[b - a for a, b in zip(m[1:], m[2:])] for m in epochs], [m[1] for m in epochs], formats


@pytest.mark.parametrize("method, flags", [("simclr", ["--channels_last"]), ("byol", ["--single_mask"])])
def test_the_host_reads_the_device_only_at_checks(monkeypatch, count_reads, tmp_path, method, flags):
    # --log_every 3 over two epochs of 4 steps: checks after steps 3, 4 (epoch's end), 6 and 8 (end). One
    # process: each check is one read (the stats' copy); nothing in between, the data loading included.
    reads, before_first, formats = per_iteration_reads(monkeypatch, count_reads, tmp_path, "--method", method,
                                                       "--epochs", "2", "--log_every", "3", *flags)
    assert reads == [[0, 0, 1, 1], [0, 1, 0, 1]] and before_first == [0, 0]
    assert all(formats) == ("--channels_last" in flags) and len(formats) == 8      # the model's layout


def test_a_nan_between_checks_stops_the_run_before_any_save(capsys, tmp_path, monkeypatch):
    # The encoder loss turns NaN at step 2; the one check of this run comes at --max_steps 3 (log_every
    # 20, as on CUDA): it must name the term and the step, and exit before end_of_epoch writes anything.
    real, calls = adios.ADIOS.encoder_loss, []

    def poisoned(self, *args, **kwargs):
        loss, stats = real(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), {**stats, "ssl_loss": stats["ssl_loss"] * float("nan")}) if len(calls) >= 2 \
            else (loss, stats)
    monkeypatch.setattr(adios.ADIOS, "encoder_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--output_dir", str(out), "--max_steps", "3", "--log_every", "20"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "non-finite encoder loss at step 2 (epoch 0)" in err, err
    assert len(calls) == 3                                   # it ran on to the check, and no further
    assert not (out / "checkpoint.pth").exists() and not (out / "log.jsonl").exists()


def test_a_stop_signal_between_checks_still_saves(capsys, tmp_path, monkeypatch):
    # One process needs no agreement: SIGTERM during step 2 stops the run right after it, long before
    # the next check (--log_every 20), and the checkpoint holds step 2.
    real, calls = train.adios_step, []

    def signalled(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(train, "adios_step", signalled)
    out = tmp_path / "out"
    log = train.main([*TINY, "--output_dir", str(out), "--epochs", "2", "--log_every", "20"])
    assert "stopped by signal" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (log["step"], ckpt["step"], ckpt["epoch"], len(calls)) == (2, 2, 0, 2)
    assert len(read_log(out)) == 1


def test_checks_default_to_every_20_steps_on_cuda_and_every_step_on_the_cpu():
    args = recipes.get_args_parser().parse_args([])
    assert args.log_every is None
    assert train.check_every(args, torch.device("cuda")) == 20 and train.check_every(args, torch.device("cpu")) == 1
    args.log_every = 5
    assert train.check_every(args, torch.device("cuda")) == train.check_every(args, torch.device("cpu")) == 5
