"""Tests of the training step made ready for a GPU, on the CPU: the host reads the step statistics only
every --log_every steps and at an epoch's end (train.py:train_one_epoch), a NaN between two reads still
stops the run before anything is saved, a stop signal still saves, inputs come in the model's memory
format, and the synchronised per-slot BatchNorm keeps no float32 copy of bf16 activations for its
backward (encoders.SlotNormalise) while its results stay those of the straightforward autograd version.
"""
import os
import signal

import pytest
import torch
import torch.distributed as dist

import adios
import encoders
import train
from encoders import SlotSyncBatchNorm, global_slot_moments, slot_statistics
from test_train import TINY, read_log

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


def test_the_stats_stay_on_the_device():
    torch.manual_seed(0)
    model = adios.ADIOS(encoders.build_encoder("resnet18", 32, "standard")[0], 512, masker=None, num_classes=4,
                        proj_hidden_dim=16, proj_output_dim=8)
    x = torch.randn(2, 4, 3, 32, 32)
    _, stats = model.encoder_loss(x[0], x[1], torch.tensor([0, 1, -1, 3]))
    assert {"ssl_loss", "penalty", "online_ce", "online_acc"} <= set(stats)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())


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


# ---- the synchronised per-slot BatchNorm: what autograd keeps ---------------------------------------

class AutogradSyncBatchNorm(SlotSyncBatchNorm):
    """The reference: the layer as encoders.py wrote it before SlotNormalise, autograd through every
    operation on a float32 (or float64) copy of the input."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.to(torch.promote_types(x.dtype, torch.float32))
            mean, var, count = global_slot_moments(x32, self.slots)
            if self.track_running_stats:
                self.update_running_stats(mean, var, count)
            scale = torch.rsqrt(var + self.eps)
            shift = -mean * scale
            if self.affine:
                scale, shift = scale * self.weight, shift * self.weight + self.bias
            S, C = mean.shape
            shape = (S, 1, C) + (1,) * (x32.dim() - 2)
            y = x32.unflatten(0, (S, -1)) * scale.to(x32.dtype).view(shape) + shift.to(x32.dtype).view(shape)
            return y.flatten(0, 1).to(x.dtype)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A gloo group of one process, so that the layer's collectives run (summing over one rank)."""
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def synchronised(one_rank_group, monkeypatch):
    monkeypatch.setattr(encoders, "synchronising", lambda: True)


def layers(dtype, **options):
    """(SlotSyncBatchNorm, the autograd reference) with equal random affine parameters."""
    g = torch.Generator().manual_seed(0)
    ours = SlotSyncBatchNorm(3, **options).to(dtype)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5, generator=g)
            ours.bias.uniform_(-0.5, 0.5, generator=g)
    ref = AutogradSyncBatchNorm(3, **options).to(dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def run_layer(layer, x, grad, slots):
    """(output, input grad, parameter grads, buffers, bytes autograd saved) of one train-mode call."""
    x = x.detach().clone().requires_grad_()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()     # each storage once
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), slot_statistics(layer, slots):
        out = layer(x)
    (out.float() * grad).sum().backward()
    params = {k: p.grad for k, p in layer.named_parameters()}
    return out, x.grad, params, dict(layer.named_buffers()), sum(saved.values())


CASES = {"2d-channels_last": (4, (3, 5, 5), True, {}), "2d-cumulative": (2, (3, 4, 6), False, dict(momentum=None)),
         "1d-no_affine": (4, (3,), False, dict(affine=False)), "1d-length": (3, (3, 7), False, {})}


@pytest.mark.parametrize("name", CASES)
def test_sync_batchnorm_results_are_the_autograd_ones_float64(synchronised, name):
    slots, rest, channels_last, options = CASES[name]
    g = torch.Generator().manual_seed(1)
    spread = torch.rand(slots, 1, *rest[:1], *[1] * (len(rest) - 1), generator=g, dtype=torch.float64) * 3 + 0.5
    x = (torch.randn(slots, 5, *rest, generator=g, dtype=torch.float64) * spread + 2 * spread).flatten(0, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ours, ref = layers(torch.float64, **options)
    got, want = run_layer(ours, x, grad, slots), run_layer(ref, x, grad, slots)
    for a, b, what in zip(got[:4], want[:4], ("output", "input grad", "parameter grads", "buffers")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_sync_batchnorm_keeps_bf16_activations_in_bf16(synchronised):
    # (S·B, C, H, W) = (4·8, 3, 16, 16) in bf16: the reference keeps a float32 copy (4 bytes a value),
    # ours the input itself (2 bytes); the gradients agree to float32 rounding of the same bf16 input.
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(32, 3, 16, 16, generator=g) * 2 + 1).to(torch.bfloat16)
    grad = torch.randn(x.shape, generator=g)
    ours, ref = layers(torch.float32)
    got, want = run_layer(ours, x, grad, 4), run_layer(ref, x, grad, 4)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    activation = x.numel()
    assert want[4] >= 4 * activation and got[4] <= 2 * activation + 1024, (got[4], want[4])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)                   # the same forward arithmetic
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-2)
    for k in got[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-4, atol=1e-4, msg=k)


def test_checks_default_to_every_20_steps_on_cuda_and_every_step_on_the_cpu():
    args = train.get_args_parser().parse_args([])
    assert args.log_every is None
    assert train.check_every(args, torch.device("cuda")) == 20 and train.check_every(args, torch.device("cpu")) == 1
    args.log_every = 5
    assert train.check_every(args, torch.device("cuda")) == train.check_every(args, torch.device("cpu")) == 5
