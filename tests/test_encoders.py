"""Tests of encoders.py: the backbones, their stems, torchvision-compatible weights and the ViT's timm
initialisation (CPU, seconds)."""
import pytest
import torch
import torch.nn as nn
import torchvision

from encoders import build_encoder


@pytest.mark.parametrize("arch, img, dim", [("resnet18", 32, 512), ("resnet18", 64, 512),
                                            ("vit_tiny", 32, 192)])
def test_encoder_features(arch, img, dim):
    net, feat_dim = build_encoder(arch, img)
    assert feat_dim == dim and net(torch.randn(2, 3, img, img)).shape == (2, dim)


def test_resnet_stems_follow_the_size_rule():
    assert build_encoder("resnet18", 32)[0].conv1.kernel_size == (3, 3)
    assert build_encoder("resnet18", 96)[0].conv1.kernel_size == (7, 7)
    assert build_encoder("resnet18", 32, stem="standard")[0].conv1.kernel_size == (7, 7)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_weights_load_into_plain_torchvision(arch):
    net, _ = build_encoder(arch, 96)
    reference = getattr(torchvision.models, arch)()
    assert set(net.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}
    result = reference.load_state_dict(net.state_dict(), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(reference.layer4[-1].conv2.weight, net.layer4[-1].conv2.weight)


@pytest.mark.parametrize("arch, img", [("vgg", 32), ("vit_tiny", 40)])
def test_encoder_rejects_unknown_arch_and_unpatchable_size(arch, img):
    with pytest.raises(ValueError):
        build_encoder(arch, img)


# ---- ViT initialisation as the released runs' timm (0.4.12–0.5.x) -------------------------------------

@pytest.mark.parametrize("arch, width", [("vit_tiny", 192), ("vit_small", 384)])
def test_vit_draws_from_timm_distributions(arch, width):
    torch.manual_seed(0)
    net, feat_dim = build_encoder(arch, 32)
    assert feat_dim == width

    def normal02(t):                                          # std .02 within 10 %, centred, inside ±2
        return abs(t.std().item() - .02) < .1 * .02 and t.abs().max() < 2 and abs(t.mean()) < .002

    assert normal02(net.class_token) and normal02(net.encoder.pos_embedding)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    attentions = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(linears) == 12 * 3 and len(attentions) == 12                 # fc1, fc2, out_proj per block
    for m in linears:
        assert normal02(m.weight) and torch.all(m.bias == 0)
    for m in attentions:
        assert normal02(m.in_proj_weight) and torch.all(m.in_proj_bias == 0)
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # the patch embedding: PyTorch's default Conv2d draw, uniform in ±1/√fan_in (fan_in = 3·16·16)
    bound = 1 / (3 * 16 * 16) ** 0.5
    w, b = net.conv_proj.weight, net.conv_proj.bias
    assert w.abs().max() <= bound and abs(w.std().item() - bound / 3 ** 0.5) < .05 * bound
    assert b.abs().max() <= bound and b.abs().max() > bound / 2
