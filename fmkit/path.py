"""Probability paths: how training pairs (noise x0, data x1) are interpolated at time t."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from fmkit.errors import FmkitError


@dataclass
class PathSample:
    """A point on the path and the velocity the model must learn there.

    Attributes:
        x_t: (B, C, H, W) the interpolated state at time t.
        velocity: (B, C, H, W) the conditional target velocity d x_t / d t.
        t: (B,) the times, in [0, 1] (0 = noise, 1 = data).
    """

    x_t: Tensor
    velocity: Tensor
    t: Tensor


class ProbabilityPath(ABC):
    """A conditional probability path from noise (t = 0) to data (t = 1)."""

    @abstractmethod
    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """Interpolate.

        Args:
            x0: (B, C, H, W) noise.
            x1: (B, C, H, W) data.
            t: (B,) times in [0, 1].
        """

    def t_from_noise_ratio(self, ratio: Tensor) -> Tensor:
        """The time at which the path's noise-to-signal ratio sigma_t / alpha_t equals `ratio`
        (x_t = alpha_t x1 + sigma_t x0), (B,) -> (B,). Time distributions defined on noise
        levels (EDM's) use it; a path that has no such ratio leaves this unimplemented."""
        raise FmkitError(
            f"path {type(self).__name__} does not map noise levels to times, which this time "
            "sampling needs (implement ProbabilityPath.t_from_noise_ratio)"
        )
