"""Tests of batchnorm.py in one process (CPU, float64, seconds): per-slot BatchNorm against one call per slot,
the synchronised layer's conversion and its autograd, the released order of BatchNorm updates and their
closed-form blend, and the precise BatchNorm statistics of eval_linear.py --precise_bn. The two-process
runs of the synchronised layer are in test_batchnorm_sync.py.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import batchnorm
from batchnorm import (SlotBatchNorm2d, SlotSyncBatchNorm, apply_statistics, convert_to_slot_batchnorm,
                       deferred_statistics, released_order, slot_statistics)
from helpers import tiny_adios, tiny_encoder

IMG = 16


# ---- per-slot statistics in one process ----

@pytest.mark.parametrize("momentum", [0.1, None])
def test_slot_batchnorm_equals_one_call_per_slot(momentum):
    """Running statistics and outputs of the batched slots equal S separate train-mode calls."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=momentum).double()
    plain.weight.data.uniform_(0.5, 1.5)
    slotted = convert_to_slot_batchnorm(nn.Sequential(copy.deepcopy(plain)))[0]
    assert isinstance(slotted, SlotBatchNorm2d)
    x = torch.randn(3, 5, 4, 6, 6, dtype=torch.float64) * torch.arange(1, 4).view(3, 1, 1, 1, 1)
    expected = torch.cat([plain(x[s]) for s in range(3)])
    with slot_statistics(slotted, 3):
        out = slotted(x.flatten(0, 1))
    torch.testing.assert_close(out, expected)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(slotted, name), getattr(plain, name))
    assert slotted.slots == 1                                  # restored after the block


def test_sync_conversion_keeps_weights_and_state_dict_keys():
    """Multi-process runs swap in SlotSyncBatchNorm (per-slot statistics over all ranks; test_batchnorm_sync.py runs it)."""
    model = tiny_adios("byol")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for module in (model.net, model.target):
        convert_to_slot_batchnorm(module, sync=True)
    assert sum(isinstance(m, SlotSyncBatchNorm) for m in model.modules()) == count == 7
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_without_a_process_group_it_is_the_single_process_slot_batchnorm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4).double()
    local = convert_to_slot_batchnorm(nn.Sequential(copy.deepcopy(plain)))[0]
    synced = convert_to_slot_batchnorm(nn.Sequential(copy.deepcopy(plain)), sync=True)[0]
    assert isinstance(local, SlotBatchNorm2d) and isinstance(synced, SlotSyncBatchNorm) and not dist.is_initialized()
    x = torch.randn(12, 4, 3, 3, dtype=torch.float64) * torch.arange(1, 13, dtype=torch.float64).view(12, 1, 1, 1)
    results = []
    for layer in (local, synced):
        xi = x.clone().requires_grad_()
        with slot_statistics(layer, 3):
            out = layer(xi)
        out.pow(3).sum().backward()
        results.append((out, xi.grad, layer.weight.grad, layer.running_var, layer.num_batches_tracked))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# ---- the released order of BatchNorm updates, blended in closed form ----

def test_released_order_of_one_simclr_iteration():
    # two slots: per slot a then bm_n; the probe's a, b through the backbone only; the masker step's loop
    assert released_order("simclr", 2, "encoder", "encoder") == ["a", "bm0", "a", "bm1", "a", "b"]
    assert released_order("simclr", 2, "encoder", "heads") == ["a", "bm0", "a", "bm1"]
    assert released_order("simclr", 2, "masker", "encoder") == ["a", "bm0", "a", "bm1"]
    assert released_order("simsiam", 1, "masker", "heads") == ["a", "b", "am0", "bm0"]
    assert released_order("byol", 1, "encoder", "target_encoder") == ["a", "bm0", "a", "b", "a", "bm0"]
    assert released_order("byol", 1, "masker", "target_heads") == []


@pytest.mark.parametrize("momentum", [0.1, None])
def test_blending_in_closed_form_equals_one_call_per_batch(momentum):
    """apply_statistics over an order with repeats equals plain BatchNorm called on those batches in order."""
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * s for n, s in (("a", 1), ("b", 3), ("c", .5))}
    plain = nn.BatchNorm2d(4, momentum=momentum).double()
    ours = convert_to_slot_batchnorm(nn.Sequential(copy.deepcopy(plain)))
    order = ["a", "b", "a", "c", "a", "a", "b"]
    for n in order:
        plain(xs[n])
    with deferred_statistics(ours), slot_statistics(ours, ["a", "b", "c"]):
        out = ours(torch.cat([xs["a"], xs["b"], xs["c"]]))
        assert ours[0].running_mean.abs().sum() == 0          # nothing moved yet
        apply_statistics([ours], order)
    torch.testing.assert_close(out[:5], nn.functional.batch_norm(xs["a"], None, None, training=True))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours[0], name), getattr(plain, name))


# ---- the synchronised per-slot BatchNorm: what autograd keeps ---------------------------------------

class AllReduceWithGrad(torch.autograd.Function):
    """Sum over all processes, with a gradient: x (any shape) on each rank → Σ_r x_r on every rank.

    Every rank's loss depends on every rank's x through the sum, so the gradient for this rank's x is
    the SUM over ranks of the gradients their outputs received: the backward is one more all-reduce.
    (dist.all_reduce alone works in place and has no gradient.) The reference below differentiates
    through it; batchnorm.py needs none (SlotNormalise differentiates the moments itself).
    """

    @staticmethod
    def forward(ctx, x):
        total = x.clone(memory_format=torch.contiguous_format)   # all_reduce overwrites its argument
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def global_slot_moments(x, slots):
    """The reference's moments, as encoders.py computed them before SlotNormalise: batchnorm.global_slot_moments
    with the all-reduce differentiable (AllReduceWithGrad), so that autograd runs through every operation.
    Mean (S, C), biased variance (S, C) and count (S, 1) of each slot's images on all ranks, in float64."""
    parts = x.unflatten(0, (slots, -1))                       # (S, B, C, …)
    dims = [1, *range(3, parts.dim())]                        # all but slot and channel
    var, mean = torch.var_mean(parts, dim=dims, correction=0)   # (S, C) each, this rank's images
    mean, var = mean.double(), var.double()
    n = parts.numel() // (parts.shape[0] * parts.shape[2])    # values per slot and channel on this rank
    count = torch.full_like(mean[:, :1], n)                   # (S, 1)
    sums = AllReduceWithGrad.apply(torch.cat([n * mean, n * (var + mean ** 2), count], dim=1))   # (S, 2C + 1)
    C = mean.shape[1]
    count = sums[:, -1:]                                      # (S, 1) images × positions on all ranks
    mean = sums[:, :C] / count
    return mean, (sums[:, C:2 * C] / count - mean ** 2).clamp(min=0), count


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
    monkeypatch.setattr(batchnorm, "synchronising", lambda: True)


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


# ---- eval_linear.py --precise_bn ---------------------------------------------------------------------

def test_precise_batchnorm_is_the_cumulative_average_over_clean_batches():
    torch.manual_seed(0)
    encoder = tiny_encoder().double()
    bn = encoder[1]
    bn.running_mean.fill_(5.0)                                # what training left: to be replaced
    images = torch.randn(12, 3, IMG, IMG, dtype=torch.float64) * 2 + 1
    drawn = []                                                # the shuffled order the loader takes

    class Recorded(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            drawn.append(i)
            return super().__getitem__(i)

    dataset = Recorded(images, torch.zeros(12, dtype=torch.long))
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if "running" not in k and "num_b" not in k}
    seen = batchnorm.precise_batchnorm(encoder.eval(), dataset, 2, 4, 0, torch.device("cpu"), seed=3)
    assert seen == 8 and not encoder.training and bn.momentum == 0.1
    # by hand: the first BatchNorm's input is conv(x); its statistics per shuffled batch, averaged with equal weights
    order = torch.tensor(drawn)
    assert len(order) == 8 and len(set(drawn)) == 8
    with torch.no_grad():
        outs = [encoder[0](images[order[i:i + 4]]) for i in (0, 4)]                   # 2 × (4, 8, h, w)
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in outs]).mean(0)   # unbiased
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    assert int(bn.num_batches_tracked) == 2
    for k, v in weights.items():
        assert torch.equal(encoder.state_dict()[k], v), k
