"""Tests of bench.py (CPU, seconds): it runs, and its released schedule is the same mathematics as ours.
Its --world mode (bench_world.py): test_bench_world.py."""
import copy
import json

import pytest
import torch

import batchnorm
import bench
import recipes
import released_loop
from helpers import BENCH_TINY as TINY
from losses import byol_loss


def test_main_times_both_schedules(capsys):
    result = bench.main([*TINY, "--steps", "1", "--repeats", "1", "--warmup", "1"])
    assert result["ours_ms"] > 0 and result["released_ms"] > 0 and result["speedup"] > 0
    assert result["ours_gflop"] < result["released_gflop"]          # the clean view is encoded once, not N times
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ours_ms", "released_ms", "speedup", "device"} <= set(line)
    assert line["speedup"] == result["speedup"]


def pair(method):
    """Ours and the released side in float64, from identical weights, with every SimSiam term on."""
    torch.set_num_threads(1)                                  # 2 threads on a shared 2-core machine thrash
    a = bench.get_args_parser().parse_args([*TINY, "--method", method, "--dataset", "shapes"])
    args = bench.train_args(a, torch.device("cpu"))
    torch.manual_seed(0)
    (ours, _, _), (released, _, _) = bench.build_pair(args, torch.device("cpu"), num_classes=4)
    for model in (ours, released):
        model.double()
        model.simsiam_terms = dict(masked_targets=True, unmasked=True, both_masked=True)
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(2, 6, 3, 32, 32, generator=g, dtype=torch.float64)      # 2 × (B, 3, H, W)
    labels = torch.tensor([0, 1, 2, 3, -1, 1])
    return ours, released, x_a, x_b, labels


def grads(module):
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(ours, released):
    a, b = grads(ours), grads(released)
    assert set(a) == set(b) and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam"])
def test_released_schedule_is_the_same_mathematics(method):
    ours, released, x_a, x_b, labels = pair(method)
    assert ours.batch_slots and not released.batch_slots
    # Encoder step: same loss (SSL sum + online probe), same gradients for f_θ.
    with batchnorm.as_released(ours, "encoder"):          # BatchNorm's running statistics as train.py moves them
        loss, _ = ours.encoder_loss(x_a, x_b, labels)
    ref = released_loop.encoder_loss(released, x_a, x_b, labels)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    assert_same_grads(ours.net, released.net)
    # Masker step: same loss −Σ L_ssl + α·P, same gradients for M_φ, none for f_θ.
    for model in (ours, released):
        model.zero_grad(set_to_none=True)
    with batchnorm.as_released(ours, "masker"):
        loss, _ = ours.masker_loss(x_a, x_b)
    ref = released_loop.masker_loss(released, x_a, x_b)
    torch.testing.assert_close(loss, ref + byol_constant_term(released, x_a, x_b))
    loss.backward()
    ref.backward()
    assert_same_grads(ours.masker, released.masker)
    assert not grads(released.net) and all(p.requires_grad for p in released.net.parameters())
    # No weight moved in between: both sides' BatchNorm buffers (BYOL's target too) hold the same state.
    for k, v in released.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)


def byol_constant_term(model, x_a, x_b):
    """BYOL: Σ_n 2 − 2·cos(p_a, t_bm), the masker step's term that ours leaves out (constant in φ); else 0.
    Computed on a copy, so that no running statistic of model moves."""
    if model.method != "byol":
        return 0
    model = copy.deepcopy(model)
    with torch.no_grad():
        m_b, p_a = model.masker(x_b), model.net(x_a).p
        return sum(byol_loss(p_a, model.target(x_b * (1 - m_b[:, n:n + 1])).z) for n in range(m_b.shape[1]))


def test_loader_reports_cpu_workers_and_gpu_augment(capsys, tmp_path):
    # stl10 is absent from tmp_path: bench falls back to the generated shapes at the requested size.
    result = bench.main(["--loader", "--device", "cpu", "--threads", "1", "--dataset", "stl10", "--data_dir",
                         str(tmp_path), "--img_size", "32", "--batch_size", "8", "--workers", "0",
                         "--batches", "2", "--num_images", "32"])
    assert result["dataset"] == "shapes" and result["img_size"] == 32
    assert result["cpu_workers"]["0"] > 0 and result["gpu_augment"] > 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["cpu_workers"] == result["cpu_workers"]


def test_syncs_counts_the_host_waits_of_train_loop(capsys):
    # --log_every 2 over 3 iterations: checks after steps 2 and 3 (the end), one read each; none between.
    result = bench.main([*TINY, "--syncs", "--log_every", "2", "--steps", "3", "--method", "byol"])
    assert result["mode"] == "syncs" and result["per_iteration"] == [0, 1, 1]
    assert result["between_checks"] == 0 and result["at_checks"] == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["per_iteration"] == result["per_iteration"]


def test_cpu_figures_keep_their_ground(monkeypatch):
    """`python bench.py --device cpu` times ResNet18 at 32 px, batch 64, N 4, c 16 (README's "Performance"
    figures), whatever the CPU demo's defaults become; a flag given still wins."""
    monkeypatch.setitem(recipes.SHAPES_DEFAULTS, "num_masks", 3)          # a demo that changed
    monkeypatch.setitem(recipes.SHAPES_DEFAULTS, "batch_size", 16)
    seen = []
    monkeypatch.setattr(bench, "bench_iteration", lambda a, device: seen.append(bench.train_args(a, device)) or {})
    bench.main(["--device", "cpu", "--threads", "1"])
    bench.main(["--device", "cpu", "--threads", "1", "--num_masks", "2"])
    ground, given = seen
    assert (ground.img_size, ground.stem, ground.batch_size, ground.num_masks, ground.mask_channels) == \
        (32, "standard", 64, 4, 16)
    assert given.num_masks == 2 and given.batch_size == 64
