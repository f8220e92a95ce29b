import pytest
import torch

from fmkit import FmkitError, UNet, registry


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build(**options):
    image_size = options.pop("image_size", 32)
    return registry("backbones").build("unet", options, image_size=image_size, channels=3)


def test_ddpm_cifar10_config_has_35_7m_parameters():
    model = build(base_channels=128, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,))
    assert abs(n_params(model) - 35.7e6) / 35.7e6 < 0.01


def test_ddim_celeba_config_has_78_7m_parameters():
    model = build(base_channels=128, channel_mult=(1, 2, 2, 2, 4), image_size=64)
    assert abs(n_params(model) - 78.7e6) / 78.7e6 < 0.01


def test_seed_constructor_and_output_shape():
    model = UNet(in_channels=3, time_emb_dim=128, base_channels=64)
    x = torch.randn(2, 3, 64, 64)
    assert model(x, torch.rand(2)).shape == x.shape


@pytest.mark.parametrize("size, mult", [(16, (1, 2)), (24, (1, 2, 2, 2)), (8, (1,))])
def test_any_size_the_downsampling_allows(size, mult):
    model = build(
        base_channels=8, channel_mult=mult, num_res_blocks=1, attn_resolutions=(), image_size=size
    )
    x = torch.randn(3, 3, size, size)
    out = model(x, torch.rand(3))
    assert out.shape == x.shape


def test_attention_and_time_change_the_output():
    torch.manual_seed(0)
    model = build(base_channels=8, channel_mult=(1, 2), attn_resolutions=(8,), image_size=16)
    # Zero-initialised layers hide the time input at initialisation: give every layer weights.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    a = model(x, torch.tensor([0.1, 0.1]))
    b = model(x, torch.tensor([0.9, 0.9]))
    assert not torch.allclose(a, b)
    assert any(type(m).__name__ == "AttnBlock" for m in model.down.modules())


def test_bad_sizes_are_clear_errors():
    with pytest.raises(FmkitError, match="image size 30 must be a multiple of 8"):
        build(image_size=30)
    with pytest.raises(FmkitError, match="attention resolution 12 never occurs"):
        build(image_size=32, attn_resolutions=(12,))
