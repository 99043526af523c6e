"""Wiring: the places where a one-line slip (a dropped argument, a constant for a variable, a missing
`.detach()`) would leave every other test passing while the method quietly changes. Each test names the
behaviour it guards; all run on CPU in seconds, on tiny models (float64 where values are compared), and
the two train.py runs share one module-scoped fixture. The wirings inside one module live with that
module's tests: 5 (the probe's standardisation) in test_eval_linear.py, 6 (--gpu_aug) in
test_gpu_augment.py, 8, 9 and 11 (learning rates, weight decay, LARS) in test_optim.py.
"""
import contextlib
import copy
import types

import pytest
import torch
import torch.nn as nn

import adios
import monitor
import optim
import run_setup
import train
from adios import ADIOS
from helpers import CPU, TINY, opt_args, parsed, tiny_adios, views
from losses import byol_tau, simclr_loss


# ---- 1. SimCLR's temperature reaches the loss --------------------------------------------------------

def test_simclr_temperature_reaches_the_loss():
    # --temperature reaches ADIOS, and ADIOS's SimCLR loss is NT-Xent at that T for every slot: written
    # out here with T = 0.5 given by hand (the loss function's own default is 0.2).
    assert run_setup.build_model(parsed("--temperature", "0.5", "--num_masks", "2"), 4).temperature == 0.5
    model = tiny_adios("simclr", temperature=0.5)
    x_a, x_b = views()
    loss, _ = model.encoder_loss(x_a, x_b)
    with torch.no_grad():
        z_a, masks = model.net(x_a).z, model.masker(x_b)                   # masks (B, N, H, W)
        per_slot = [model.net(x_b * (1 - masks[:, n:n + 1])).z for n in range(masks.shape[1])]
    expected = sum(simclr_loss(z_a, z_bm, 0.5) for z_bm in per_slot)
    at_default = sum(simclr_loss(z_a, z_bm) for z_bm in per_slot)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=1e-12)
    assert abs(expected - at_default) > 1e-3                                # T visibly matters here


# ---- 2 and 3: one BYOL run with the fp16 GradScaler, stopped after 2 steps and resumed ---------------

@pytest.fixture(scope="module")
def byol_fp16_resumed(tmp_path_factory):
    """train.main: BYOL with --precision fp16, 2 epochs of 4 steps with the encoder's schedule one epoch
    shorter (--encoder_early_end 1): steps 0-1, then a resume for steps 2-3. Records the τ every
    momentum_update receives and the GradScaler's state before every step; between the two parts the
    checkpoint's scale is set to 2¹¹, as if overflows had lowered it (fp32 steps never change it).

    The GradScaler is on (fp16) but autocast is off: fp16 kernels on a CPU take ~30 s a step here, and
    what is checked is the scaler's state, not fp16 arithmetic."""
    out = tmp_path_factory.mktemp("byol_fp16")
    flags = [*TINY, "--output_dir", str(out), "--method", "byol", "--precision", "fp16", "--num_masks", "2",
             "--epochs", "2", "--warmup_epochs", "1", "--encoder_early_end", "1"]
    record = dict(taus=[], scalers=[])
    real_autocast, real_step, real_update = train.autocast_for, train.adios_step, ADIOS.momentum_update

    def fp32_compute(args, device):
        real_autocast(args, device)
        return contextlib.nullcontext

    def step_spy(*args, **kwargs):
        scaler = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.amp.GradScaler))
        record["scalers"].append(copy.deepcopy(scaler.state_dict()))
        return real_step(*args, **kwargs)

    def update_spy(self, tau):
        record["taus"].append(tau)
        return real_update(self, tau)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "autocast_for", fp32_compute)
        mp.setattr(train, "adios_step", step_spy)
        mp.setattr(ADIOS, "momentum_update", update_spy)
        train.main([*flags, "--max_steps", "2"])
        saved = torch.load(out / "checkpoint.pth", weights_only=True)
        saved["scaler"]["scale"] = 2.0 ** 11
        torch.save(saved, out / "checkpoint.pth")
        train.main([*flags, "--max_steps", "4"])
    record.update(saved=saved, final=torch.load(out / "checkpoint.pth", weights_only=True))
    return record


def test_byol_target_gets_the_tau_of_each_step(byol_fp16_resumed):
    # BYOL Sec. 3.2: τ rises on a cosine over the whole run (8 steps: the masker's length, not the
    # encoder's 4), evaluated at each global step, also after a resume.
    taus = byol_fp16_resumed["taus"]
    assert taus == pytest.approx([byol_tau(step, 8) for step in range(4)], rel=0, abs=1e-15)
    assert len(set(taus)) == 4


def test_resume_restores_the_fp16_grad_scaler(byol_fp16_resumed):
    saved, scalers = byol_fp16_resumed["saved"], byol_fp16_resumed["scalers"]
    assert saved["step"] == 2 and len(scalers) == 4
    assert scalers[0]["scale"] == 2.0 ** 16 and scalers[1]["_growth_tracker"] == 1      # a fresh scaler, on
    assert scalers[2] == saved["scaler"]                     # the resumed step 2 starts from the saved state
    assert byol_fp16_resumed["final"]["scaler"]["scale"] == 2.0 ** 11                   # and keeps it


# ---- 4. every epoch shows new views, reproducibly ----------------------------------------------------

def epoch_views(loader, epoch):
    """Every view of one epoch from train.py's loader, as a list of (x_a, x_b) batches."""
    loader.sampler.set_epoch(epoch)
    return [(x_a.clone(), x_b.clone()) for (x_a, x_b), _ in loader]


def view_bytes(batches):
    return {v.numpy().tobytes() for x_a, x_b in batches for x in (x_a, x_b) for v in x}


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (a1, a2), (b1, b2) in zip(a, b):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_every_epoch_shows_new_views_reproducibly():
    # The loader as train.py builds it, with two worker processes: no view of epoch 1 repeats one of
    # epoch 0 (each image is seen anew), yet an epoch's views are fixed by (seed, epoch): the same
    # loader replaying epoch 0, and a fresh one (a resumed run) at epoch 1, give them bit for bit.
    args = parsed("--workers", "2")
    loader = run_setup.build_data(args, CPU, 1, True)[0]
    assert loader.num_workers == 2
    first, second = epoch_views(loader, 0), epoch_views(loader, 1)
    assert len(view_bytes(first)) == len(view_bytes(second)) == 2 * 32            # 32 images, two views each
    repeated = len(view_bytes(first) & view_bytes(second))
    assert repeated == 0                                  # no view of epoch 0 is shown again in epoch 1
    assert_same_batches(epoch_views(loader, 0), first)
    assert_same_batches(epoch_views(run_setup.build_data(args, CPU, 1, True)[0], 1), second)


# ---- 7. the online probe never trains the encoder ----------------------------------------------------

def test_online_probe_leaves_the_encoders_gradients_alone():
    model = tiny_adios("simclr", num_classes=4)
    without = copy.deepcopy(model)
    x_a, x_b = views()
    model.encoder_loss(x_a, x_b, torch.tensor([0, 1, 2, 3, -1, 1]))[0].backward()
    without.encoder_loss(x_a, x_b)[0].backward()
    assert model.classifier.weight.grad.abs().sum() > 0                       # the probe did learn
    for (name, p), q in zip(model.net.encoder.named_parameters(), without.net.encoder.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14, msg=name)
    for p, q in zip(model.net.projector.parameters(), without.net.projector.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-14)


# ---- 10. a step's random draws differ between ranks --------------------------------------------------

def test_each_rank_draws_its_own_step_randomness(monkeypatch):
    # train_one_epoch seeds each step with train.step_seed(seed, step, rank): the same step on two ranks
    # draws differently (ADIOS-s slots, random and block masks), the same rank and step identically.
    seeds = {train.step_seed(s, step, r) for s in range(3) for step in range(500) for r in range(8)}
    assert len(seeds) == 3 * 500 * 8
    draws = {}

    def spy(*args, **kwargs):
        draws.setdefault(rank, []).append(torch.rand(3))
        return {"ssl_loss": 1.0}, {}

    monkeypatch.setattr(train, "adios_step", spy)
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([dict(params=[p], lr=0.1, base_lr=0.1)], lr=0.1)
    loader = [((torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)), torch.zeros(2, dtype=torch.long))] * 3
    schedules = dict(encoder=dict(warmup=1, total=3), masker=dict(warmup=1, total=3), last_step=3)
    model = types.SimpleNamespace(method="simclr", train=lambda: None)
    for rank in (0, 1, 0):
        monkeypatch.setattr(train, "distributed_world", lambda: (rank, 2))
        train.train_one_epoch(model, loader, opt, None, None, None, 0, 0, schedules,
                              types.SimpleNamespace(seed=5, channels_last=False, log_every=1),
                              CPU, dict(signal=None))
        if rank == 0 and len(draws[0]) == 6:
            assert all(torch.equal(a, b) for a, b in zip(draws[0][:3], draws[0][3:]))
    assert all(not torch.equal(a, b) for a, b in zip(draws[0], draws[1]))


# ---- the difference from the released runs that we follow: ADIOS-s SimSiam hides one slot index ------

@pytest.mark.parametrize("objective", ["encoder_loss", "masker_loss"])
def test_adios_s_simsiam_hides_the_same_slot_in_both_views(monkeypatch, objective):
    # The released ADIOS-s SimSiam run draws one slot per image and hides it in both views; which slot
    # is hidden is read back from the hidden masks themselves.
    hidden = []
    real = adios.slots_to_hide
    monkeypatch.setattr(adios, "slots_to_hide",
                        lambda masks, *a: hidden.append((masks, real(masks, *a))) or hidden[-1][1])
    model = tiny_adios("simsiam", num_masks=4, single_mask=True)
    x_a, x_b = views(B=16)
    picks = []
    for seed in range(3):
        hidden.clear()
        torch.manual_seed(seed)
        getattr(model, objective)(x_a, x_b)
        assert len(hidden) == 2                                  # view b, then view a
        which = []
        for masks, (hide,) in hidden:                            # masks (B, N, H, W), hide (B, 1, H, W)
            which.append([next(n for n in range(masks.shape[1]) if torch.equal(hide[b, 0], masks[b, n]))
                          for b in range(len(masks))])
        assert which[0] == which[1]
        picks += which[0]
    assert set(picks) == {0, 1, 2, 3}                            # a random slot per image, not a fixed one


# ---- 12. more wirings --------------------------------------------------------------------------------

def test_every_model_flag_reaches_the_model():
    # run_setup.build_model hands each flag to its own argument: a swap or a dropped keyword would
    # build a valid model of another recipe without a word.
    args = parsed("--method", "simsiam", "--num_masks", "3", "--single_mask", "--alpha", "0.7",
                  "--alpha_entropy", "0.3", "--temperature", "0.35", "--simsiam_unmasked",
                  "--no-simsiam_masked_targets", "--simsiam_both_masked", "--no_gather", "--mask_channels", "8",
                  "--mask_norm", "in", "--mask_blocks", "3", "--proj_hidden_dim", "24", "--proj_output_dim", "12",
                  "--pred_hidden_dim", "20")
    model = run_setup.build_model(args, num_classes=4)
    assert (model.method, model.alpha, model.alpha_entropy, model.temperature) == ("simsiam", 0.7, 0.3, 0.35)
    assert model.single_mask and not model.gather_negatives
    assert model.simsiam_terms == dict(masked_targets=False, unmasked=True, both_masked=True)
    assert (model.masker.num_masks, model.masker.num_blocks) == (3, 3)
    assert isinstance(model.masker.down[0][1], nn.InstanceNorm2d) and model.masker.head.in_channels == 8     # c
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert (linears[0].out_features, linears[-1].out_features) == (24, 12)
    assert [m for m in model.predictor.modules() if isinstance(m, nn.Linear)][0].out_features == 20
    assert model.classifier.out_features == 4


def test_evaluation_between_epochs_leaves_the_training_state_alone():
    # monitor.probe_top1 runs the online probe on held-out images at every epoch's end: in eval mode, so
    # no BatchNorm running statistic moves, and the model is back in train mode for the next epoch.
    model = tiny_adios("simclr", num_classes=4).float()
    model.train()
    before = copy.deepcopy(model.state_dict())
    loader = [(torch.randn(8, 3, 16, 16) * 3 + 1, torch.randint(4, (8,))) for _ in range(2)]
    top1 = monitor.probe_top1(model, loader, CPU, contextlib.nullcontext())
    assert 0 <= top1 <= 100 and model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_grad_scaler_wraps_both_players_steps():
    # adios_step with a GradScaler at 2¹⁰ (fp16's path) takes the very steps of the unscaled one: each
    # backward is scaled and each optimiser step unscales first (float64, SGD: every tensor is sensitive).
    x_a, x_b = views()
    labels = torch.tensor([0, 1, 2, 3, -1, 1])
    results = []
    for enabled in (False, True):
        model = tiny_adios("byol", num_classes=4)
        opt_enc, opt_mask = optim.build_optimizers(model, opt_args("byol", optimizer="sgd"))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=enabled)
        train.adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, contextlib.nullcontext)
        results.append(model.state_dict())
    before = tiny_adios("byol", num_classes=4).state_dict()
    plain, scaled = results
    assert any(not torch.equal(plain[k], before[k]) for k in plain if k.startswith("masker."))
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("precision, dtype",
                         [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_precision_flag_sets_the_autocast_dtype(precision, dtype):
    args = types.SimpleNamespace(precision=precision, channels_last=None)
    amp = run_setup.autocast_for(args, CPU)
    a = torch.randn(4, 4)
    with amp():
        assert (a @ a).dtype == dtype
    assert args.channels_last is False
