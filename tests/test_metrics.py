"""The Fréchet distance, and the quality benchmark end to end in a tiny configuration."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import benchmark

from fmkit.metrics import feature_distance, frechet_distance, gaussian_stats


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Independent computation: scipy's matrix square root, as in the original FID code."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("shift", [0.0, 0.3, 2.0])
def test_frechet_distance_matches_scipy(shift):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.8 + shift
    ours = feature_distance(torch.tensor(a), torch.tensor(b))
    assert ours == pytest.approx(scipy_frechet(a, b), rel=1e-6, abs=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
    x = torch.randn(300, 8, dtype=torch.float64)
    assert frechet_distance(*gaussian_stats(x), *gaussian_stats(x)) < 1e-8


def test_quality_benchmark_feature_distance_zero_for_identical_large_for_noise():
    quality = benchmark("quality")
    images, labels = quality.digits()
    (gen_x, _), (cls_x, cls_y), floor_x = quality.split(images, labels)
    classifier = quality.train_classifier(cls_x, cls_y, epochs=3)
    reference = quality.features(classifier, gen_x)
    assert feature_distance(reference, reference) < 1e-6
    floor = feature_distance(quality.features(classifier, floor_x), reference)
    noise = torch.randn(len(floor_x), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert feature_distance(quality.features(classifier, noise), reference) > 10 * floor


def test_quality_benchmark_runs_end_to_end(tmp_path, capsys):
    quality = benchmark("quality")
    out = tmp_path / "q.json"
    quality.main(
        [
            "--max-steps",
            "2",
            "--samples",
            "16",
            "--solvers",
            "euler:2,euler:2:schedule=power:power=2,dopri5",
            "--classifier-epochs",
            "1",
            "--phema",
            "0.05,0.2",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert (
        "| default | 2 |" in printed and "smallest Euler step count within 10% of dopri5" in printed
    )
    (result,) = json.loads(out.read_text())
    assert result["steps"] == 2 and result["final"]["euler:2"]["nfe"] == 2
    # the grid option reaches the solver: same NFE, different samples, different score
    graded = result["final"]["euler:2:schedule=power:power=2"]
    assert graded["nfe"] == 2 and graded["fd"] != result["final"]["euler:2"]["fd"]
    assert [c["step"] for c in result["checkpoints"]] == [1, 2]
    assert result["floor"] > 0
    # Post-hoc EMA widths reconstructed from the run's snapshots, scored with every solver.
    assert [p["sigma_rel"] for p in result["phema"]] == [0.05, 0.2]
    assert all(set(p["fd"]) == set(result["final"]) for p in result["phema"])
    assert "post-hoc EMA (distance per solver)" in printed and "best at euler:2" in printed


def test_fewstep_benchmark_runs_end_to_end(tmp_path, capsys):
    fewstep = benchmark("fewstep")
    out = tmp_path / "f.json"
    fewstep.main(
        ["--steps", "2", "--reflow-steps", "2", "--pairs", "64", "--samples", "16", "--parallel", "1",
         "--classifier-epochs", "1", "--keep", str(tmp_path / "runs"), "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| MeanFlow | euler:1:schedule=uniform | 1 |" in printed and "reflow at 4 NFE" in printed
    result = json.loads(out.read_text())
    models = result["models"]
    assert models["reflow (2-RF)"]["scores"]["euler:2:schedule=uniform"]["nfe"] == 2
    assert models["flow matching"]["scores"]["ab2:8:schedule=edm"]["nfe"] == 8
    assert (tmp_path / "runs" / "pairs" / "meta.json").is_file()
    # Flow-map students distilled from the teacher, in both forms, at 1-8 jumps.
    for form in ("lagrangian", "eulerian"):
        scores = models[f"distilled ({form})"]["scores"]
        assert [s["nfe"] for s in scores.values()] == [1, 2, 4, 8]
    assert "distilled (lagrangian): 1 NFE / dopri5" in printed


def test_coupling_benchmark_runs_end_to_end(tmp_path, capsys):
    coupling = benchmark("coupling")
    coupling.main(["--part", "quality", "--steps", "2", "--parallel", "1", "--samples", "16",
                   "--classifier-epochs", "1"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| independent |" in printed and "| ot |" in printed and "| sinkhorn |" in printed


def test_demo_benchmark_times_a_real_server(capsys):
    demo = benchmark("demo")
    demo.main(["--image-size", "16"])  # the 35.7M widths, at a resolution the CPU does quickly
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cold, first, warm, nfe = (float(cell) for cell in row.strip("| ").split(" | "))
    assert cold > first > 0 and warm > 0 and nfe == 20
