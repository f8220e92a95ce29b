import pytest
import torch

from fmkit import FlowMatching, registry, sample_time


class ConstantTarget(torch.nn.Module):
    """The exact marginal velocity when all data is the image `c`: v(x, t) = (c - x) / (1 - t)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so the module has a device

    def forward(self, x, t):
        return (self.c - x) / (1 - t).clamp_min(1e-3).view(-1, 1, 1, 1)


def test_linear_path_formula_and_target():
    path = registry("paths").build("linear", {"sigma_min": 0.1})
    x0, x1 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    s = path.sample(x0, x1, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(s.x_t, tt * x1 + (1 - 0.9 * tt) * x0)
    torch.testing.assert_close(s.velocity, x1 - 0.9 * x0)
    torch.testing.assert_close(s.x_t[0], x0[0])  # t = 0 is noise
    torch.testing.assert_close(s.x_t[-1], x1[-1] + 0.1 * x0[-1])  # t = 1 is data (+ sigma_min)
    # The target is the time derivative of x_t.
    eps = 1e-3
    ahead = path.sample(x0, x1, t + eps).x_t
    torch.testing.assert_close((ahead - s.x_t) / eps, s.velocity, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("solver", ["euler", "rk4", "dopri5"])
def test_sampling_with_the_exact_field_reaches_the_data(solver):
    c = torch.full((3, 8, 8), 0.5)
    flow = FlowMatching(ConstantTarget(c), device="cpu")
    out = flow.sample(num_samples=3, num_steps=50, image_size=(8, 8), channels=3, solver=solver)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, c.expand(3, 3, 8, 8), atol=0.05, rtol=0)


def test_loss_is_zero_for_the_exact_field_and_positive_otherwise():
    x1 = torch.full((5, 3, 8, 8), 0.5)
    flow = FlowMatching(ConstantTarget(x1[0]))
    t = torch.linspace(0.1, 0.9, 5)
    assert flow.loss(x1, t=t).item() < 1e-10
    wrong = FlowMatching(ConstantTarget(-x1[0]))
    assert wrong.loss(x1, t=t).item() > 0.1


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = registry("backbones").build(
        "unet",
        {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": ()},
        image_size=8,
        channels=1,
    )
    flow = FlowMatching(model)
    data = torch.zeros(16, 1, 8, 8)
    data[:, :, 2:6, 2:6] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        loss = flow.loss(data, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_seed_sample_api_is_reproducible_with_a_generator():
    model = registry("backbones").build(
        "unet",
        {"base_channels": 8, "channel_mult": (1, 2), "attn_resolutions": ()},
        image_size=16,
        channels=3,
    )
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    flow = FlowMatching(model, device="cpu")
    a = flow.sample(
        num_samples=2,
        num_steps=3,
        image_size=(16, 16),
        channels=3,
        generator=torch.Generator().manual_seed(7),
    )
    b = flow.sample(
        num_samples=2,
        num_steps=3,
        image_size=(16, 16),
        channels=3,
        generator=torch.Generator().manual_seed(7),
    )
    assert a.shape == (2, 3, 16, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.training  # sampling restores the training mode


def test_time_sampling():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_time(20000, "uniform", generator=gen)
    logit = sample_time(20000, "logit_normal", generator=gen)
    assert 0 <= uniform.min() and uniform.max() < 1
    assert 0 < logit.min() and logit.max() < 1
    # Logit-normal concentrates around t = 0.5.
    assert (logit - 0.5).abs().mean() < (uniform - 0.5).abs().mean()
    assert abs(uniform.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="unknown time sampling"):
        sample_time(2, "cosine")


def test_edm_time_sampling_is_skewed_to_the_data_end():
    gen = torch.Generator().manual_seed(0)
    edm = sample_time(20000, "edm", generator=gen, path=registry("paths").build("linear"))
    assert 0 < edm.min() and edm.max() < 1
    # ln sigma ~ N(-1.2, 1.2^2) and t = 1 / (1 + sigma): the median t is sigmoid(1.2).
    assert abs(edm.median().item() - torch.sigmoid(torch.tensor(1.2)).item()) < 0.01
    shifted = sample_time(20000, "logit_normal", loc=1.0, scale=0.5, generator=gen)
    assert abs(shifted.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
