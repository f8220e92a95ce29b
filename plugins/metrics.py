"""The built-in metrics: FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and improved
precision/recall (Kynkaanniemi et al. 2019), on Inception-v3 features; KID and precision/recall
are torch-fidelity's implementations."""

from __future__ import annotations

import torch
from torch import Tensor

from fmkit import hookimpl
from fmkit.metrics import Metric, frechet_distance, gaussian_stats

PRC_SEED = 2020  # picks the reference subsample for precision/recall


class Fid(Metric):
    """Fréchet Inception distance (Heusel et al. 2017).

    The Fréchet distance between Gaussians fitted to the samples' and the reference's
    features."""

    columns = ("fid",)

    def compute(self, features: Tensor, reference) -> dict[str, float]:
        return {"fid": frechet_distance(*gaussian_stats(features), reference.mu, reference.sigma)}

    def line(self, results: dict) -> str:
        return f"FID {results['fid']:.4g}"


class Kid(Metric):
    """Kernel Inception distance (Binkowski et al. 2018).

    An unbiased MMD with a cubic polynomial kernel, averaged over 100 subsets of up to 1,000
    images."""

    per_image = True
    columns = ("kid_mean",)

    def compute(self, features: Tensor, reference) -> dict[str, float]:
        from torch_fidelity.metric_kid import kid_features_to_metric

        gen, real = features.float(), reference.features.float()
        kid = kid_features_to_metric(
            gen,
            real,
            kid_subsets=100,
            kid_subset_size=min(1000, len(gen), len(real)),
            kid_kernel="poly",
            kid_kernel_poly_degree=3,
            kid_kernel_poly_gamma=None,
            kid_kernel_poly_coef0=1,
            rng_seed=2020,
            verbose=False,
        )
        return {
            "kid_mean": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"],
        }

    def line(self, results: dict) -> str:
        return f"KID {results['kid_mean']:.4g} ± {results['kid_std']:.2g}"


class PrecisionRecall(Metric):
    """Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 neighbours."""

    per_image = True
    columns = ("precision", "recall")
    better = "higher"

    def compute(self, features: Tensor, reference) -> dict[str, float]:
        from torch_fidelity.metric_prc import prc_features_to_metric

        gen, real = features.float(), reference.features.float()
        # The paper compares equally many real and generated images; torch-fidelity also builds
        # a dense real x real distance matrix, which for a whole training split (CelebA:
        # 162,770) would need over 100 GB. So the reference is a fixed-seed subsample of as
        # many images as were generated.
        if len(real) > len(gen):
            pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(PRC_SEED))
            real = real[pick[: len(gen)]]
        prc = prc_features_to_metric(
            gen, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False
        )
        return {
            "precision": prc["precision"],
            "recall": prc["recall"],
            "prc_reference_images": len(real),
        }

    def line(self, results: dict) -> str:
        return f"precision {results['precision']:.3f}, recall {results['recall']:.3f}"


@hookimpl
def register_metrics(register):
    register("fid", Fid)
    register("kid", Kid)
    register("prc", PrecisionRecall)
