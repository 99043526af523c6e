"""Tests of masker.py: the learned mask generator (U-Net) and the mask-scheme baselines (CPU, seconds)."""
import pytest
import torch

from adios import ADIOS
from encoders import build_encoder
from masker import BlockMasker, Masker, RandomPatchMasker


# ---- the learned masker ----

@pytest.mark.parametrize("norm", ["gn", "in", "none"])
@pytest.mark.parametrize("img", [16, 32, 64, 96])
def test_masks_partition_every_pixel(norm, img):
    m = Masker(4, img, base_channels=8, norm=norm)
    masks = m(torch.randn(2, 3, img, img))
    assert masks.shape == (2, 4, img, img)
    assert (masks >= 0).all()
    torch.testing.assert_close(masks.sum(1), torch.ones(2, img, img))


def test_masker_block_count_and_table():
    assert Masker(2, 32).num_blocks == 4 and Masker(2, 96).num_blocks == 5 and Masker(2, 224).num_blocks == 6
    m = Masker(2, 96, base_channels=8)                        # the K = 5 row of the table
    assert [b[0].in_channels for b in m.down] == [3, 8, 8, 16, 16]
    assert [b[0].out_channels for b in m.down] == [8, 8, 16, 16, 16]
    assert [b[0].in_channels for b in m.up] == [32, 32, 32, 16, 16]
    assert [b[0].out_channels for b in m.up] == [16, 16, 8, 8, 8]
    assert m.mlp[0].in_features == 16 * 6 * 6 and m.mlp[2].out_features == 128


def test_unet_skips_carry_the_image_past_the_bottleneck():
    # With the bottleneck MLP silenced (its last layer zeroed), the masks can depend on the image only
    # through the U-Net's skip connections: they must still differ between images and across pixels.
    torch.manual_seed(0)
    m = Masker(4, 32, base_channels=8)
    with torch.no_grad():
        m.mlp[-2].weight.zero_()
        m.mlp[-2].bias.zero_()
    masks = m(torch.randn(2, 3, 32, 32))                      # (2, 4, 32, 32)
    assert (masks[0] - masks[1]).abs().max() > 1e-2
    assert masks[0].flatten(1).std(dim=1).max() > 1e-2


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_masks=3, img_size=100), "multiple of 16"),
    (dict(num_masks=3, img_size=32, base_channels=12), "GroupNorm"),
    (dict(num_masks=1, img_size=32), "at least 2"),
    (dict(num_masks=0, img_size=32), "at least 2"),
    (dict(num_masks=3, img_size=32, norm="bn"), "norm"),
])
def test_masker_rejects_what_it_cannot_take(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Masker(**kwargs)


# ---- mask-scheme baselines ---------------------------------------------------------------------

def test_random_patch_masker_hides_exactly_75_percent():
    m = RandomPatchMasker(32)
    assert m.patch == 2 and m.num_masks == 1 and not list(m.parameters())
    x = torch.randn(16, 3, 32, 32, requires_grad=True)
    hide = m(x)
    assert hide.shape == (16, 1, 32, 32) and hide.dtype == x.dtype and not hide.requires_grad
    assert set(hide.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hide.mean(dim=(1, 2, 3)), torch.full((16,), 0.75))   # 192 of 256 cells, each image
    assert not torch.equal(hide[0], hide[1])                 # each image its own cells
    big = RandomPatchMasker(96)                               # 7-px patches, 14 × 14 cells, last ones cropped
    cells = big(torch.zeros(4, 3, 96, 96))[:, 0, ::7, ::7]    # (4, 14, 14): one pixel per cell
    assert big.patch == 7 and cells.shape == (4, 14, 14)
    assert cells.sum(dim=(1, 2)).tolist() == [147.0] * 4      # round(0.75 · 196)


def test_block_masker_hides_about_30_percent():
    m = BlockMasker(32)
    assert m.num_masks == 1 and m.min_area == 4 and not list(m.parameters())
    hide = m(torch.randn(256, 3, 32, 32))
    assert hide.shape == (256, 1, 32, 32) and set(hide.unique().tolist()) == {0.0, 1.0}
    area = hide.mean(dim=(1, 2, 3))                           # (256,)
    assert (area >= 0.3).all() and area.mean() <= 0.45
    assert not torch.equal(hide[0], hide[1])
    assert BlockMasker(96)(torch.zeros(8, 3, 96, 96)).mean(dim=(1, 2, 3)).min() >= 0.3


@pytest.mark.parametrize("baseline", [RandomPatchMasker(32), BlockMasker(32)])
def test_baselines_fill_the_masker_slot(baseline):
    torch.manual_seed(0)
    encoder, feat_dim = build_encoder("resnet18", 32, stem="standard")
    model = ADIOS(encoder, feat_dim, masker=baseline, proj_hidden_dim=32, proj_output_dim=16)
    x_a, x_b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, stats = model.encoder_loss(x_a, x_b)
    loss.backward()
    assert torch.isfinite(loss) and stats["area_0"] >= 0.3
