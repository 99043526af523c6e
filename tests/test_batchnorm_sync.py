"""Tests of the per-slot synchronised BatchNorm and of train.py under torchrun: two processes, CPU, gloo.

Two processes with half a batch each must compute what one process computes on the whole batch: the
layer (batchnorm.SlotSyncBatchNorm) against the paper's per-slot loop of plain BatchNorm calls, and two
steps of train.py against one process with the doubled batch, all in float64. One torchrun launch
runs every two-process part (processes are slow to start on a small CPU); the one-process references
run here meanwhile, and the tests compare.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import train
from batchnorm import convert_to_slot_batchnorm, slot_statistics
from helpers import REPO, TESTS


# ---- the layer, on each rank ------------------------------------------------------------------------

# Each case: BatchNorm kind and the per-image shape after C, S slots, images per slot on rank 0 and
# rank 1 (unequal halves too), channels_last, and the BatchNorm options.
CASES = {
    "2d-S4": dict(kind="2d", rest=(5, 5), S=4, per_rank=(3, 3)),
    "2d-S4-unequal-channels_last-cumulative": dict(kind="2d", rest=(5, 5), S=4, per_rank=(2, 3),
                                                   channels_last=True, momentum=None),
    "2d-S1-unequal": dict(kind="2d", rest=(4, 6), S=1, per_rank=(3, 5)),
    "2d-S1-channels_last": dict(kind="2d", rest=(5, 5), S=1, per_rank=(4, 4), channels_last=True),
    "1d-S4": dict(kind="1d", rest=(), S=4, per_rank=(2, 2)),
    "1d-S4-unequal-length-no_affine": dict(kind="1d", rest=(7,), S=4, per_rank=(1, 2), affine=False),
    "1d-S1-untracked": dict(kind="1d", rest=(), S=1, per_rank=(4, 4), track_running_stats=False),
}
C = 3


def make_case(name):
    """The plain BatchNorm (float64, random affine), the global inputs x and upstream gradients g,
    each (S, B0 + B1, C, …): slot s holds rank 0's B0 images, then rank 1's B1. Deterministic."""
    case = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    options = dict(momentum=case.get("momentum", 0.1), affine=case.get("affine", True),
                   track_running_stats=case.get("track_running_stats", True))
    bn = (nn.BatchNorm2d if case["kind"] == "2d" else nn.BatchNorm1d)(C, **options).double()
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.5, 0.5, generator=g)
    shape = (case["S"], sum(case["per_rank"]), C, *case["rest"])
    # Each slot its own scale and offset, so statistics mixed across slots or ranks show up.
    spread = torch.rand(case["S"], 1, C, *[1] * len(case["rest"]), generator=g, dtype=torch.float64) * 3 + 0.5
    x = torch.randn(shape, generator=g, dtype=torch.float64) * spread + 2 * spread
    return bn, x, torch.randn(shape, generator=g, dtype=torch.float64)


def rank_share(name, x, rank):
    """This rank's (S·B_r, C, …) batch: its images of every slot, slot after slot."""
    B0 = CASES[name]["per_rank"][0]
    local = (x[:, :B0] if rank == 0 else x[:, B0:]).flatten(0, 1)
    return local.contiguous(memory_format=torch.channels_last) if CASES[name].get("channels_last") else local


def run_layer(name, rank):
    """One train-mode forward and backward of the synchronised layer on this rank's share, then an
    eval-mode forward. loss = Σ out · g over this rank's images: summed over the ranks, the global loss."""
    bn, x, g = make_case(name)
    layer = convert_to_slot_batchnorm(nn.Sequential(bn), sync=True)[0]
    local = rank_share(name, x, rank).requires_grad_()
    with slot_statistics(layer, CASES[name]["S"]):
        out = layer(local)
    (out * rank_share(name, g, rank)).sum().backward()
    result = dict(out=out.detach(), grad=local.grad, channels_last=out.is_contiguous(memory_format=torch.channels_last),
                  buffers={k: v.clone() for k, v in layer.named_buffers()},
                  weight_grad=layer.weight.grad if layer.affine else None,
                  bias_grad=layer.bias.grad if layer.affine else None)
    layer.eval()
    result["eval_out"] = layer(local.detach())
    return result


def run_half_precision(rank):
    """Case 2d-S4 with a float32 layer and bfloat16 input under autocast: (output, running mean)."""
    bn, x, _ = make_case("2d-S4")
    layer = convert_to_slot_batchnorm(nn.Sequential(bn.float()), sync=True)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), slot_statistics(layer, 4):
        out = layer(rank_share("2d-S4", x, rank).to(torch.bfloat16))
    return out, layer.running_mean


def count_model():
    """Three BatchNorm layers (2d, 2d, 1d) between convolutions and a linear layer, synchronised."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6))
    return convert_to_slot_batchnorm(net.double(), sync=True)


def count_collectives(S, rank):
    """(forward, backward) collectives of one step of count_model on S slots of 2 images: all slots in
    one call ("batched", ours), and one call per slot ("per_slot": the paper's loop, also the count of
    the former layer, torch's SyncBatchNorm called once per slot, one collective per call and direction)."""
    calls, names = [], ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast")
    real = {name: getattr(dist, name) for name in names}

    def counting(fn):
        def counted(*args, **kwargs):
            calls.append(fn)
            return fn(*args, **kwargs)
        return counted

    x = torch.randn(S * 2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    counts = {}
    for schedule in ("batched", "per_slot"):
        net = count_model()
        for name, fn in real.items():
            setattr(dist, name, counting(fn))
        try:
            if schedule == "batched":
                with slot_statistics(net, S):
                    out = net(x)
            else:
                out = torch.cat([net(part) for part in x.chunk(S)])
            forward = len(calls)
            out.square().sum().backward()
            counts[schedule] = (forward, len(calls) - forward)
        finally:
            for name, fn in real.items():
                setattr(dist, name, fn)
            calls.clear()
    return counts


def layer_results(rank):
    """Everything the layer tests compare, computed on this rank (called inside the torchrun launch)."""
    return dict(cases={name: run_layer(name, rank) for name in CASES}, bf16=run_half_precision(rank),
                counts={S: count_collectives(S, rank) for S in (1, 4)})


# ---- the launch: layer cases, then train.py (float64), in two processes ---------------------------
# train.py runs in float64 (torch's default dtype; the shapes views then come out in float64 too).
# In float32 the two runs part after the first step by ~3e-3 (relative) in the masker's gradient, as
# one float32 process does from the same run in float64: once the encoder has stepped, a few ReLU
# inputs lie within float32's rounding of 0 (one in layer2.0, batch 16, seed 0), so another summation
# order (a batch split in two) flips them and the gradient through them jumps. In float64: ~1e-13.

TORCHRUN_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path[:0] = [{repo!r}, {tests!r}]
import run_setup, test_batchnorm_sync, train
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.save(test_batchnorm_sync.layer_results(rank), os.path.join({out!r}, f"layer{{rank}}.pth"))
group = dist.new_group(backend="gloo")        # the marker-file rule: one disk for both, then one each
disks = [run_setup.sees_rank0_files(os.path.join({out!r}, folder), group) for folder in ("shared", f"own{{rank}}")]
torch.save(disks, os.path.join({out!r}, f"disks{{rank}}.pth"))

torch.set_default_dtype(torch.float64)
record, real_step, real_distribute = {{}}, train.adios_step, run_setup.distribute
def adios_step(model, x_a, x_b, labels, *rest):
    record.setdefault("batches", []).append((x_a.clone(), x_b.clone(), labels.clone()))
    return real_step(model, x_a, x_b, labels, *rest)
def distribute(model, *args, **kwargs):
    record["model"] = model
    return real_distribute(model, *args, **kwargs)
train.adios_step, run_setup.distribute = adios_step, distribute
init, destroy = dist.init_process_group, dist.destroy_process_group
dist.init_process_group = dist.destroy_process_group = lambda *args, **kwargs: None   # one group for all
for method in {methods!r}:
    out = os.path.join({out!r}, "ddp_" + method)
    train.main([*sys.argv[1:], "--method", method, "--output_dir", out])
    torch.save(dict(batches=record.pop("batches"), state=record.pop("model").state_dict()),
               os.path.join(out, f"rank{{rank}}.pth"))
destroy()
"""

# test_train.py's tiny run (helpers.TINY) with N = 2 slots, 4 images per process (8 per step, 4 steps an epoch),
# two steps, α₂ on.
TINY = ["--num_images", "32", "--workers", "0", "--proj_hidden_dim", "32", "--proj_output_dim", "16",
        "--pred_hidden_dim", "16", "--mask_channels", "8", "--num_masks", "2", "--img_size", "16", "--device", "cpu",
        "--precision", "fp32", "--max_steps", "2",
        "--alpha_entropy", "0.5"]        # α₂, a sum over the batch: the processes must weigh it as one process does
METHODS = ("simclr", "byol")


def one_process_run(out, method):
    """train.main in this process (float64), batch 8 = both ranks' 4: its batches, final and initial state."""
    batches, initial, real_step = [], {}, train.adios_step

    def adios_step(model, x_a, x_b, labels, *rest):
        initial.update(initial or copy.deepcopy(model.state_dict()))
        batches.append((x_a.clone(), x_b.clone(), labels.clone()))
        return real_step(model, x_a, x_b, labels, *rest)

    default = torch.get_default_dtype()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "adios_step", adios_step)
        try:
            torch.set_default_dtype(torch.float64)
            train.main([*TINY, "--batch_size", "8", "--method", method, "--output_dir", str(out)])
        finally:
            torch.set_default_dtype(default)
    return batches, torch.load(out / "checkpoint.pth", weights_only=True)["model"], initial


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The torchrun launch (its output folder and exit), and the one-process runs made meanwhile (or
    what they raised: only the train.py test needs them)."""
    out = tmp_path_factory.mktemp("two_ranks")
    script = out / "two_ranks.py"
    script.write_text(TORCHRUN_SCRIPT.format(repo=REPO, tests=TESTS, out=str(out), methods=METHODS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *TINY, "--batch_size", "4"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        try:
            single = {m: one_process_run(out / f"one_{m}", m) for m in METHODS}
        except (Exception, SystemExit) as e:
            single = e
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    return dict(out=out, returncode=process.returncode, stderr=stderr, single=single)


@pytest.fixture(scope="module")
def layer_ranks(launch):
    paths = [launch["out"] / f"layer{r}.pth" for r in range(2)]
    assert all(p.exists() for p in paths), launch["stderr"][-3000:]
    return [torch.load(p, weights_only=False) for p in paths]


# ---- the layer tests: two ranks against one process running the per-slot loop (float64) ----------

def per_slot_loop(bn, x, g):
    """The paper's loop in one process: S train-mode BatchNorm calls, one per slot's global batch.
    Returns (out, input grad) as (S, B0 + B1, C, …), and the layer after (buffers, parameter grads)."""
    x = x.clone().requires_grad_()
    out = torch.stack([bn(x[s]) for s in range(x.shape[0])])
    (out * g).sum().backward()
    return out.detach(), x.grad, bn


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_process_running_the_per_slot_loop(layer_ranks, name):
    out, grad, ref = per_slot_loop(*make_case(name))
    _, x, _ = make_case(name)
    got = [layer_ranks[r]["cases"][name] for r in range(2)]
    for rank in range(2):
        # Outputs and input gradients: each rank's share of the whole-batch ones. The global loss is
        # the sum of the ranks' losses, and the layer's backward all-reduce hands each rank the
        # gradient of that global loss for its own images (its statistics feed every rank's output).
        torch.testing.assert_close(got[rank]["out"], rank_share(name, out, rank))
        torch.testing.assert_close(got[rank]["grad"], rank_share(name, grad, rank))
        assert got[rank]["channels_last"] == bool(CASES[name].get("channels_last"))
        for key, value in ref.named_buffers():                # running mean, var, num_batches_tracked
            torch.testing.assert_close(got[rank]["buffers"][key], value, msg=key)
        # Eval mode: plain BatchNorm with the running statistics (or, untracked, this rank's batch).
        torch.testing.assert_close(got[rank]["eval_out"], ref.eval()(rank_share(name, x, rank)))
    if ref.affine:
        # γ and β: each rank's backward gives the gradient from its own images only; their SUM is the
        # whole batch's (what DDP's all-reduce forms, before it divides by the world size as the loss does).
        for p in ("weight", "bias"):
            torch.testing.assert_close(got[0][f"{p}_grad"] + got[1][f"{p}_grad"], getattr(ref, p).grad, msg=p)
            assert not torch.allclose(got[0][f"{p}_grad"], getattr(ref, p).grad)   # a real split


def test_one_collective_per_layer_and_direction_for_all_slots(layer_ranks):
    # count_model has 3 BatchNorm layers. (forward, backward) collectives per step:
    for rank in range(2):
        counts = layer_ranks[rank]["counts"]
        assert counts[4]["batched"] == (3, 3)                  # all 4 slots in one call: 1 per layer
        assert counts[4]["per_slot"] == (12, 12)               # one call per slot: S per layer
        assert counts[1]["batched"] == counts[1]["per_slot"] == (3, 3)


def test_half_precision_input_keeps_its_dtype_and_float32_statistics(layer_ranks):
    bn, x, g = make_case("2d-S4")
    out, _, ref = per_slot_loop(bn, x.to(torch.bfloat16).double(), g)        # what the layer saw, exactly
    for rank in range(2):
        got, running_mean = layer_ranks[rank]["bf16"]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), rank_share("2d-S4", out, rank), rtol=1e-2, atol=2e-2)
        # the statistics are float32's, not rounded to bfloat16's 3 significant digits
        torch.testing.assert_close(running_mean.double(), ref.running_mean, rtol=1e-6, atol=1e-6)


def test_each_process_learns_whether_it_shares_rank_0s_disk(launch):
    # run_setup.py:sees_rank0_files decides who downloads (--download): rank 0, and the first process of
    # every machine whose disk does not hold rank 0's marker. Here: one shared folder, then one per rank.
    seen = [torch.load(launch["out"] / f"disks{r}.pth") for r in range(2)]
    assert seen == [[True, True], [True, False]], launch["stderr"][-3000:]
    assert os.listdir(launch["out"] / "shared") == os.listdir(launch["out"] / "own0") == []   # markers removed


# ---- train.py: two processes against one with the doubled batch (float64) --------------------------

def test_torchrun_two_processes_equal_one_process_with_the_doubled_batch(launch):
    assert launch["returncode"] == 0, launch["stderr"][-3000:]
    if isinstance(launch["single"], BaseException):
        raise launch["single"]
    for method in METHODS:
        ranks = [torch.load(launch["out"] / f"ddp_{method}" / f"rank{r}.pth", weights_only=True) for r in range(2)]
        batches, state, initial = launch["single"][method]
        # The data: DistributedSampler permutes with the same seed in both runs, rank r takes positions
        # r::2 of the order, and views are seeded per image: rank r's batch t is rows r::2 of batch t.
        assert len(batches) == len(ranks[0]["batches"]) == 2
        for t, whole in enumerate(batches):
            for r in range(2):
                for a, b in zip(ranks[r]["batches"][t], whole):
                    assert torch.equal(a, b[r::2])
        # Both ranks hold the very same weights and BatchNorm statistics (DDP averages the gradients;
        # the synchronised statistics are the same numbers on every rank).
        assert ranks[0]["state"].keys() == state.keys() and state["net.encoder.conv1.weight"].dtype == torch.float64
        for key in state:
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        # And they are the one process's: per-slot statistics over the global batch, gathered negatives,
        # DDP's mean of the per-rank means = the mean over the global batch (every shapes image is
        # labelled, so the online probe's per-rank means weigh equally), LARS on the same averaged
        # gradients, and BYOL's target built from the same weights by the same EMA.
        for key in state:
            torch.testing.assert_close(ranks[0]["state"][key], state[key], rtol=1e-9, atol=1e-11,
                                       msg=f"{method}: {key}")
        # Not vacuous: the two steps moved both players and the running statistics.
        for prefix in ("net.encoder.", "net.projector.", "masker.", "net.encoder.bn1.running_var"):
            assert any(not torch.allclose(state[k], initial[k], rtol=1e-4) for k in state if k.startswith(prefix))
    assert (launch["out"] / "ddp_simclr" / "checkpoint.pth").exists()
