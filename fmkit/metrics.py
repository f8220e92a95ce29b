"""Sample-quality metrics, as a plugin kind (`register_metrics`: fid, kid and precision/recall
are built in, fmkit_plugins.metrics), and the Fréchet distance between feature distributions
(the statistic behind FID)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

# The features fmkit extracts for metrics: "inception", torch-fidelity's Inception-v3 pool3
# (2048-d; fmkit.inception), of the samples and of the reference images (fmkit.reference).
FEATURES = ("inception",)


class Metric(ABC):
    """A metric of generated images against real ones, computed from features of both.

    Attributes:
        features: the features it needs (one of FEATURES).
        per_image: it needs the reference images' features, not just their mean and
            covariance (a reference file holding statistics only cannot serve it).
        columns: its result keys that a sweep's table shows, in order.
        better: "lower" or "higher": which way its first column improves (what `fmkit eval
            ema` picks the best width by).
    """

    features: str = "inception"
    per_image: bool = False
    columns: tuple[str, ...] = ()
    better: str = "lower"

    @abstractmethod
    def compute(self, features: Tensor, reference) -> dict[str, float]:
        """The metric's results (JSON numbers, added to the evaluation record).

        Args:
            features: (N, D) float64 features of the N generated images.
            reference: the real images' fmkit.reference.Reference: `mu` (D,), `sigma` (D, D)
                and, when `per_image`, `features` (M, D).
        """

    @abstractmethod
    def line(self, results: dict) -> str:
        """Its part of `fmkit eval`'s result line, e.g. "FID 12.3"."""


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau 1982; Heusel et al. 2017).

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are real
    and non-negative for covariance matrices; tiny negative round-off is clipped.
    """
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    eig = torch.linalg.eigvals(sigma1 @ sigma2).real.clamp_min(0)
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * eig.sqrt().sum()
    return max(float(value), 0.0)


def feature_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
