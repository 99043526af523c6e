"""Tests of train.py: short runs of train.main on the embedded shapes data (CPU)."""
import contextlib
import copy
import math

import pytest
import torch
import torchvision

import batchnorm
import checkpoint
import optim
import recipes
import run_setup
import train
from helpers import TINY, read_log


def run(tmp_path, *flags, name="run"):
    out = tmp_path / name
    log = train.main([*TINY, "--output_dir", str(out), *flags])
    return out, log


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("masks", [["--num_masks", "3"], ["--num_masks", "0"], ["--num_masks", "3", "--single_mask"]],
                         ids=["adios", "base", "adios-s"])
@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam"])
def test_two_iterations(tmp_path, method, masks, precision):
    out, log = run(tmp_path, "--method", method, "--max_steps", "2", "--precision", precision, *masks)
    assert log["step"] == 2 and log["epoch"] == 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(ckpt) >= {"model", "encoder", "optimizers", "scaler", "epoch", "args"}
    assert ckpt["args"]["method"] == method and ckpt["step"] == 2
    line = read_log(out)[-1]
    assert {"enc_ssl_loss", "lr", "online_top1", "images_per_s"} <= set(line)
    if masks[1] != "0":
        assert (out / "masks_epoch000.png").exists()
        assert {"mask_ssl_loss", "mask_penalty", "mask_area_0", "mask_ari"} <= set(line)
    else:
        assert not list(out.glob("masks_*.png"))


@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_fixed_mask_baselines_train_without_a_masker_step(tmp_path, mask_type):
    out, log = run(tmp_path, "--mask_type", mask_type, "--max_steps", "2")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["optimizers"]["masker"] is None and ckpt["args"]["num_masks"] == 1
    assert "mask_ssl_loss" not in log and 0.25 < log["enc_area_0"] < 0.8     # one slot: the hidden part
    assert (out / "masks_epoch000.png").exists()


def test_resume_continues_from_the_saved_epoch(tmp_path, capsys):
    out, _ = run(tmp_path, "--epochs", "1")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    _, log = run(tmp_path, "--epochs", "2", "--resume")
    assert "made with --epochs 1, the schedule now spans 2" in capsys.readouterr().out     # said, not silent
    assert [line["epoch"] for line in read_log(out)] == [0, 1]
    assert log["step"] == 8 and torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2


def test_mask_blocks_reach_the_masker_and_its_evaluation(tmp_path):
    # --mask_blocks K (four released SimSiam runs use 4 where the size rule gives 5) builds a K-block U-Net,
    # and eval_linear.py rebuilds the same one (checkpoint.learned_masker) from the checkpoint.
    out, _ = run(tmp_path, "--mask_blocks", "3", "--max_steps", "1")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["mask_blocks"] == 3
    assert {k.split(".")[2] for k in ckpt["model"] if k.startswith("masker.down.")} == {"0", "1", "2"}
    assert checkpoint.learned_masker(ckpt).num_blocks == 3


def test_saved_encoder_loads_into_torchvision(tmp_path):
    out, _ = run(tmp_path, "--max_steps", "1")
    sd = torch.load(out / "checkpoint.pth", weights_only=True)["encoder"]
    resnet = torchvision.models.resnet18()      # shapes uses the standard stem: torchvision's own
    result = resnet.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"fc.weight", "fc.bias"}


def test_adios_step_is_the_encoder_step_then_the_masker_step():
    # Sec. 2: one iteration is the encoder step, then the masker step through the just-updated encoder,
    # on the same views. Written out by hand here from the same float64 weights; the weights after must agree.
    args = recipes.resolve_args(recipes.get_args_parser().parse_args([*TINY, "--optimizer", "sgd"]))
    args.img_size = 32
    torch.manual_seed(0)
    model = run_setup.build_model(args, num_classes=4).double()
    reference, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(4, (8,), generator=g)
    opt_enc, opt_mask = optim.build_optimizers(model, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.adios_step(model, x_a, x_b, labels, opt_enc, opt_mask, scaler, contextlib.nullcontext)

    ref_enc, ref_mask = optim.build_optimizers(reference, args)
    with batchnorm.as_released(reference, "encoder"):         # BatchNorm's running statistics as train.py's
        loss, _ = reference.encoder_loss(x_a, x_b, labels)    # the encoder step ...
    ref_enc.zero_grad()
    loss.backward()
    ref_enc.step()
    with batchnorm.as_released(reference, "masker"):
        loss, _ = reference.masker_loss(x_a, x_b)             # ... then the masker step
    ref_mask.zero_grad()
    loss.backward()
    ref_mask.step()
    ours, expected = model.state_dict(), reference.state_dict()
    for player in ("net.encoder.", "masker."):                # both players moved
        assert any(not torch.equal(v, before[k]) for k, v in expected.items() if k.startswith(player))
    for k in expected:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)


def test_the_optimisers_carry_the_warmup_cosine_rates(tmp_path, monkeypatch):
    # The schedules as the run applies them: 4 steps an epoch, 3 epochs, 1 warmup epoch, and the encoder's
    # cosine ending 1 epoch early (--encoder_early_end, the released BYOL runs). Every group starts at 0.003
    # and reaches its own base rate when the warmup ends (step 4); then the encoder's cosine spans steps
    # 4-8 and stays at 0, the masker's spans steps 4-12.
    seen = []
    real = train.adios_step

    def spy(model, x_a, x_b, labels, opt_enc, opt_mask, *rest):
        seen.append({(name, g["base_lr"]): g["lr"] for name, opt in (("enc", opt_enc), ("mask", opt_mask))
                     for g in opt.param_groups})
        return real(model, x_a, x_b, labels, opt_enc, opt_mask, *rest)

    monkeypatch.setattr(train, "adios_step", spy)
    run(tmp_path, "--epochs", "3", "--warmup_epochs", "1", "--encoder_early_end", "1", "--lr", "0.2",
        "--mask_lr", "0.05", "--classifier_lr", "0.1")
    assert len(seen) == 12 and set(seen[0]) == {("enc", 0.2), ("enc", 0.1), ("mask", 0.05)}
    cosine = lambda progress: (1 + math.cos(math.pi * progress)) / 2       # noqa: E731
    expected = {0: (0, 0), 2: (0.5, 0.5), 4: (1, 1), 6: (cosine(0.5), cosine(0.25)), 8: (0, cosine(0.5)),
                11: (0, cosine(7 / 8))}           # step: (encoder, masker) as a fraction of the way to base
    for step, (enc, mask) in expected.items():
        for (player, base), lr in seen[step].items():
            fraction = enc if player == "enc" else mask
            if step < 4:
                assert lr == pytest.approx(0.003 + (base - 0.003) * fraction), (step, player)
            else:
                assert lr == pytest.approx(base * fraction, abs=1e-12), (step, player)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_channels_last_changes_the_layout_not_the_gradients(method):
    # The CUDA default, checked on CPU in float64: NHWC weights and inputs give both players the same
    # losses and gradients (no reshape in adios.py or masker.py may depend on the memory layout).
    args = recipes.resolve_args(recipes.get_args_parser().parse_args([*TINY, "--method", method]))
    args.img_size = 32
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(2, 8, 3, 32, 32, generator=g, dtype=torch.float64)
    results = []
    for channels_last in (False, True):
        args.channels_last = channels_last
        torch.manual_seed(0)
        model = run_setup.build_model(args, num_classes=4).double()
        views = [x.contiguous(memory_format=torch.channels_last) if channels_last else x for x in (x_a, x_b)]
        enc_loss, _ = model.encoder_loss(*views)
        enc_loss.backward()
        mask_loss, _ = model.masker_loss(*views)
        model.masker.zero_grad()
        mask_loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((enc_loss.item(), mask_loss.item(), grads))
    (enc0, mask0, g0), (enc1, mask1, g1) = results
    assert enc1 == pytest.approx(enc0, rel=1e-12) and mask1 == pytest.approx(mask0, rel=1e-12)
    assert g0.keys() == g1.keys() and any(n.startswith("masker.") for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12, msg=name)


def test_fp16_with_gradient_scaling_and_gpu_augmentation(tmp_path):
    out, log = run(tmp_path, "--max_steps", "2", "--precision", "fp16", "--gpu_aug", "--channels_last")
    assert log["step"] == 2 and all(map(torch.isfinite, map(torch.tensor, (log["enc_ssl_loss"], log["mask_ssl_loss"]))))
    scaler = torch.load(out / "checkpoint.pth", weights_only=True)["scaler"]
    assert scaler["scale"] > 0                       # the GradScaler's state is saved for resume
