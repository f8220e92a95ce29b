"""Exact likelihoods of a flow-matching model through the instantaneous change of variables
(Chen et al. 2018, "Neural Ordinary Differential Equations"; Grathwohl et al. 2019, "FFJORD",
for Hutchinson's trace estimator), as reported in bits/dim by Lipman et al. 2023."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fmkit.pixels import to_uint8
from fmkit.solver import Solver, Velocity, integrate


def log_likelihood(
    velocity: Velocity,
    x1: Tensor,
    solver: Solver,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """log p_1(x1) under the flow dx/dt = velocity(t, x) from a standard normal at t = 0.

    Integrates x and a = ∫ div v dt backwards from t = 1 to t = 0:
    log p_1(x1) = log N(x0; 0, I) - ∫_0^1 div v(x_t, t) dt. The divergence is Hutchinson's
    estimate eps^T (dv/dx) eps with one Rademacher eps per image, fixed over the solve.

    Args:
        x1: (B, C, H, W) data points.

    Returns:
        (B,) log-densities in nats, and the number of velocity evaluations.
    """
    shape, dims = x1.shape, x1[0].numel()
    eps = torch.randint(0, 2, shape, generator=generator, device="cpu").to(x1) * 2 - 1

    def augmented(t: Tensor, state: Tensor) -> Tensor:  # state (B, D + 1)
        with torch.enable_grad():
            x = state[:, :dims].reshape(shape).detach().requires_grad_(True)
            v = velocity(t, x)
            (eps_jacobian,) = torch.autograd.grad(v, x, eps)  # eps^T dv/dx, (B, C, H, W)
        divergence = (eps_jacobian * eps).flatten(1).sum(1)
        return torch.cat([v.detach().flatten(1), divergence[:, None]], dim=1)

    start = torch.cat(
        [x1.flatten(1), torch.zeros(shape[0], 1, dtype=x1.dtype, device=x1.device)], 1
    )
    times = torch.tensor([1.0, 0.0], dtype=x1.dtype, device=x1.device)
    solution = integrate(solver, augmented, start, times)
    x0, integral = solution.x[:, :dims], solution.x[:, dims]  # integral = -∫_0^1 div dt
    prior = -0.5 * (x0.square().sum(1) + dims * math.log(2 * math.pi))
    return prior + integral, solution.nfe


def dequantized_bits_per_dim(
    velocity: Velocity,
    images: Tensor,
    solver: Solver,
    generator: torch.Generator | None = None,
    encode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """Negative log-likelihood in bits/dim of 8-bit images with uniform dequantisation.

    Args:
        images: (B, C, H, W) in [-1, 1], as fmkit datasets yield (k / 127.5 - 1 for pixel k).
        encode: the model's lossless space (`Space.encode`, a permutation of the pixels, so
            the density is unchanged); None for pixels.

    Returns:
        (B,) bits/dim of the discrete images (an upper bound, as usual), and the NFE.
    """
    pixels = to_uint8(images).to(images.dtype)  # the 8-bit values k
    noise = torch.rand(images.shape, generator=generator, device="cpu").to(images)
    x = (pixels + noise) / 128.0 - 1.0  # (k + u) / 256 mapped to [-1, 1)
    logp, nfe = log_likelihood(velocity, x if encode is None else encode(x), solver, generator)
    dims = images[0].numel()
    # Density of k + u on [0, 256)^D: p_x * (2 / 256)^D; bits/dim = -log2 of that / D.
    return (-logp / dims + math.log(128.0)) / math.log(2.0), nfe
