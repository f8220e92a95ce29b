"""Built-in probability paths."""

from __future__ import annotations

from torch import Tensor

from fmkit import PathSample, ProbabilityPath, hookimpl


# Lipman et al. 2023, "Flow Matching for Generative Modeling" (conditional OT path), which for
# sigma_min = 0 is the rectified flow of Liu et al. 2023, "Flow Straight and Fast".
class LinearPath(ProbabilityPath):
    """Straight line from noise to data: x_t = t x1 + (1 - (1 - sigma_min) t) x0.

    Args:
        sigma_min: width of the data end of the path (0 gives rectified flow).
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = sigma_min

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        shape = (-1,) + (1,) * (x1.dim() - 1)
        tt = t.view(shape).to(x1.dtype)  # (B, 1, 1, 1)
        x_t = tt * x1 + (1 - (1 - self.sigma_min) * tt) * x0
        velocity = x1 - (1 - self.sigma_min) * x0
        return PathSample(x_t=x_t, velocity=velocity, t=t)

    def t_from_noise_ratio(self, ratio: Tensor) -> Tensor:
        # sigma_t / alpha_t = (1 - (1 - sigma_min) t) / t  =>  t = 1 / (ratio + 1 - sigma_min)
        return 1.0 / (ratio + 1.0 - self.sigma_min)


def linear(*, sigma_min: float = 0.0) -> LinearPath:
    """Conditional OT / rectified-flow straight path (Lipman et al. 2023); option sigma_min."""
    return LinearPath(sigma_min=sigma_min)


@hookimpl
def register_paths(register):
    register("linear", linear)
