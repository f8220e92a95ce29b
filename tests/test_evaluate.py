"""FID / KID / sweep / bits-per-dim on real code paths, offline: the Inception weights file is
written by the test in torch-fidelity's own format, with random initialisation."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, one_line_error, write_image

from fmkit import checkpoint
from fmkit.evaluate import score
from fmkit.inception import inception_features, load_inception
from fmkit.likelihood import log_likelihood
from fmkit.metrics import feature_distance
from fmkit.pixels import to_uint8
from fmkit.reference import reference
from fmkit.solver import build_solver


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised Inception-v3 saved as torch-fidelity expects its weights file
    (benchmarks/gpu.py writes it the same way for its offline FID stage)."""
    from conftest import benchmark

    return benchmark("gpu").random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    for i in range(16):
        write_image(root / f"{i:02d}.png", size=(16, 16), color=(i * 15, 200 - i * 10, 60 + i * 5))
    return root


def test_identical_sets_give_zero_and_shifted_sets_a_larger_fid(weights, faces, tmp_path):
    net = load_inception(weights)
    ref = reference(net, "folder", str(faces), "train", 16, {}, cache_dir=tmp_path)
    assert not ref.cached and ref.features.shape == (16, 2048)
    images = torch.stack([to_uint8(x) for x in _folder(faces)])
    same = score(net, images, ref, ("fid", "kid"))
    scale = ref.sigma.trace().item()  # FID is in units of feature variance
    assert scale > 0
    assert same["fid"] < 1e-6 * scale
    brighter = inception_features(net, (images.int() + 60).clamp(0, 255).to(torch.uint8))
    assert feature_distance(brighter, ref.features) > 0.01 * scale


def _folder(root):
    from fmkit.data import build_dataset

    data = build_dataset("folder", str(root), 16)
    return [data[i] for i in range(len(data))]


def test_reference_statistics_are_cached_and_reused(weights, faces, tmp_path):
    net = load_inception(weights)
    first = reference(net, "folder", str(faces), "train", 16, {}, cache_dir=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    again = reference(net, "folder", str(faces), "train", 16, {}, cache_dir=tmp_path)
    assert again.cached and again.path == first.path and again.path.stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.mu, first.mu)
    other = reference(net, "folder", str(faces), "train", 32, {}, cache_dir=tmp_path)
    assert other.path != first.path  # another resolution is another cache entry


def test_eval_fid_and_sweep_from_the_cli(weights, faces, tmp_path, run_cli):
    run = tmp_path / "run"
    trained = run_cli(
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--max-steps",
        2,
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--output",
        run,
        *TINY,
    )
    assert trained.exit_code == 0, trained.output
    common = [
        "--checkpoint",
        run,
        "--inception-weights",
        weights,
        "--cache-dir",
        tmp_path / "cache",
        "--num-samples",
        12,
        "--batch-size",
        6,
    ]
    result = run_cli(
        "eval",
        "fid",
        *common,
        "--solver",
        "euler",
        "--steps",
        3,
        "--metrics",
        "fid,kid,prc",
        "--json",
        tmp_path / "fid.json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "fid.json").read_text())
    # Progress bars share stderr with the result: keep what follows each carriage return.
    (line,) = [x.split("\r")[-1].strip() for x in result.output.splitlines() if "FID " in x]
    assert line.startswith(f"FID {record['fid']:.4g}, KID ") and "mean NFE 3.0" in line
    assert record["mean_nfe"] == 3 and record["num_samples"] == 12
    assert record["network"] == {"precision": "fp32", "compiled": False}  # the CPU's defaults
    assert {"kid_mean", "precision", "recall", "wall_s", "images_per_s"} <= set(record)
    # Precision/recall compares equally many real images (16 in the folder) and samples (12).
    assert record["prc_reference_images"] == 12
    assert record["reference"]["dataset"] == "folder" and record["reference"]["image_size"] == 16
    assert (
        record["backend"].startswith("torch-fidelity") and record["mode"] == "inception-v3-compat"
    )
    # Weights that are not the official file are said to be so, and the record names them.
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert record["inception"]["weights"] == f"sha256:{digest[:12]}"
    assert f"(SHA-256 {digest[:12]}...) are not torch-fidelity's official file" in result.output
    # The text names the solver's settings and the reference as a user would type them.
    assert "12 samples, euler:3, mean NFE 3.0" in line and "reference folder train at 16px" in line
    # The cached file can be passed back as --reference-stats.
    stats = record["reference"]["stats_file"]
    again = run_cli(
        "eval", "fid", *common, "--solver", "rk4", "--steps", 1, "--reference-stats", stats
    )
    assert again.exit_code == 0, again.output
    sweep = run_cli(
        "eval", "sweep", *common, "--solvers", "euler:2,midpoint:1,dopri5", "--out", tmp_path / "sw"
    )
    assert sweep.exit_code == 0, sweep.output
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["solver"] for r in rows] == ["euler:2", "midpoint:1", "dopri5"]
    assert rows[0]["mean_nfe"] == 2 and rows[1]["mean_nfe"] == 2
    assert "| euler:2 | 2.0 |" in (tmp_path / "sw" / "sweep.md").read_text()
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000


def test_missing_inception_weights_offline_is_one_clear_line(faces, tmp_path, run_cli, monkeypatch):
    run = tmp_path / "run"
    run_cli(
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--max-steps",
        1,
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--output",
        run,
        *TINY,
    )
    monkeypatch.setenv("FMKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("FMKIT_INCEPTION_WEIGHTS", raising=False)
    line = one_line_error(run_cli("eval", "fid", "--checkpoint", run, "--num-samples", 4))
    assert "no Inception weights" in line and "--inception-weights FILE" in line
    bad = tmp_path / "evil.pth"
    bad.write_bytes(b"not a state dict")
    line = one_line_error(run_cli("eval", "fid", "--checkpoint", run, "--inception-weights", bad))
    assert "is not a plain Inception state dict" in line


class GaussianField(torch.nn.Module):
    """Exact marginal velocity of the linear path from N(0, I) to N(mu, s^2 I):
    v(x, t) = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) * (x - t mu)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t):
        t = t.view(-1, 1, 1, 1).to(x)
        var = t**2 * self.s**2 + (1 - t) ** 2
        return self.mu + (t * self.s**2 - (1 - t)) / var * (x - t * self.mu)


def test_log_likelihood_matches_the_known_density():
    mu, s = 0.5, 0.3
    field = GaussianField(mu, s)
    x1 = (mu + s * torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))).double()
    velocity = lambda t, x: field(x, t.expand(x.shape[0]))  # noqa: E731
    logp, nfe = log_likelihood(
        velocity, x1, build_solver("dopri5", options={"rtol": 1e-7, "atol": 1e-7})
    )
    dims = 9
    exact = (
        -0.5 * ((x1 - mu) / s).square().flatten(1).sum(1)
        - dims * math.log(s)
        - 0.5 * dims * math.log(2 * math.pi)
    )
    torch.testing.assert_close(logp, exact, rtol=0, atol=1e-3)
    assert nfe > 0


def test_eval_nll_on_a_tiny_trained_model(faces, tmp_path, run_cli):
    run = tmp_path / "run"
    run_cli(
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        faces,
        "--image-size",
        16,
        "--batch-size",
        4,
        "--max-steps",
        3,
        "--num-samples",
        1,
        "--sample-steps",
        1,
        "--output",
        run,
        *TINY,
    )
    result = run_cli(
        "eval",
        "nll",
        "--checkpoint",
        run,
        "--num-images",
        4,
        "--batch-size",
        2,
        "--solver-opt",
        "rtol=1e-3",
        "--solver-opt",
        "atol=1e-3",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["images"] == 4 and math.isfinite(report["bits_per_dim"])
    assert 0 < report["bits_per_dim"] < 16
    assert f"{report['bits_per_dim']:.4f} bits/dim ± " in result.output
    _, meta = checkpoint.load(run / "checkpoint_final.safetensors")
    assert meta["config"]["dataset"] == "folder"
    # The safety issue's defect 5: ab2 on a dense power grid gave NaN here too (1 -> 0).
    dense = run_cli("eval", "nll", "--checkpoint", run, "--num-images", 2, "--batch-size", 2,
                    "--solver", "ab2", "--solver-opt", "schedule=power", "--solver-opt",
                    "power=4")  # fmt: skip
    assert dense.exit_code == 0, dense.output
    assert math.isfinite(json.loads(dense.output[dense.output.index("{") :])["bits_per_dim"])


def test_eval_nll_never_scores_training_images_as_test_images(faces, tmp_path, run_cli):
    from fmkit.data import build_dataset
    from fmkit.prepared import write_array

    # A prepared array records the split it was made from (here as `fmkit prepare celeba
    # --split train` would); a checkpoint trained on it is then scored on the test split.
    source = build_dataset("folder", str(faces), 16)
    prepared = write_array(source, tmp_path / "prepared", {"dataset": "celeba", "split": "train"})
    run = tmp_path / "run"
    common = ["--image-size", 16, "--batch-size", 4, "--max-steps", 1, "--num-samples", 1]
    trained = run_cli(
        "train", "--dataset", "prepared", "--data-dir", prepared, *common, "--output", run, *TINY
    )
    assert trained.exit_code == 0, trained.output
    line = one_line_error(run_cli("eval", "nll", "--checkpoint", run, "--num-images", 2))
    assert "holds the 'train' split of celeba, not 'test'" in line
    # A folder has no splits: said in one line, and the report records it.
    result = run_cli(
        "eval", "nll", "--checkpoint", run, "--dataset", "folder", "--data-dir", faces,
        "--num-images", 2, "--solver-opt", "rtol=1e-3", "--solver-opt", "atol=1e-3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "note: dataset 'folder' has no splits; --split test is ignored" in result.output
    assert json.loads(result.output[result.output.index("{") :])["split"] is None
    scored = run_cli(
        "eval", "nll", "--checkpoint", run, "--split", "train", "--num-images", 2,
        "--solver-opt", "rtol=1e-3", "--solver-opt", "atol=1e-3",
    )  # fmt: skip
    assert json.loads(scored.output[scored.output.index("{") :])["split"] == "train"


def test_published_npz_statistics_are_accepted_and_pickles_refused(
    weights, faces, tmp_path, run_cli
):
    import numpy as np

    run = tmp_path / "run"
    trained = run_cli(
        "train", "--dataset", "folder", "--data-dir", faces, "--image-size", 16,
        "--batch-size", 4, "--max-steps", 1, "--num-samples", 1, "--output", run, *TINY,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    common = ["--checkpoint", run, "--inception-weights", weights, "--num-samples", 6]
    common += ["--batch-size", 6, "--solver", "euler", "--steps", 2]
    cached = run_cli(
        "eval", "fid", *common, "--cache-dir", tmp_path / "cache", "--json", tmp_path / "a.json"
    )
    assert cached.exit_code == 0, cached.output
    first = json.loads((tmp_path / "a.json").read_text())
    # The same statistics as pytorch-fid / clean-fid store them.
    ref = reference(
        load_inception(weights), "folder", str(faces), "train", 16, {}, tmp_path / "cache"
    )
    npz = tmp_path / "fid_stats_faces16.npz"
    np.savez(npz, mu=ref.mu.numpy(), sigma=ref.sigma.numpy())
    again = run_cli("eval", "fid", *common, "--reference-stats", npz, "--json", tmp_path / "b.json")
    assert again.exit_code == 0, again.output
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert second["reference"]["file"] == npz.name and "npz" in second["reference"]["source"]
    assert second["inception"]["resize"].startswith("uint8 images, bilinear resize to 299x299")
    assert "inception-v3-compat" in second["inception"]["implementation"]
    evil = tmp_path / "evil.npz"
    np.savez(evil, mu=np.array([{"a": 1}], dtype=object), sigma=np.zeros((2, 2)))
    line = one_line_error(run_cli("eval", "fid", *common, "--reference-stats", evil))
    assert "pickled object arrays are refused" in line


def test_eval_fid_of_a_conditional_model_conditions_it_as_the_field_does(
    weights, tmp_path, run_cli
):
    """The safety issue's defect 12: `eval fid` of a conditional model took no condition and
    no guidance, so the backbone saw "unspecified" and the score was its unconditional half's.
    Now the classes follow the data's frequencies (or are uniform, or fixed), guided at the
    model's weight and interval unless asked otherwise, and the record says so."""
    from fmkit import Generator
    from fmkit.evaluate import plan_conditions

    data = tmp_path / "data"
    for i in range(16):  # 12 red, 4 blue
        name = "red" if i < 12 else "blue"
        write_image(
            data / name / f"{i:02d}.png", size=(16, 16), color=(200 if i < 12 else 20, 40, 90 + i)
        )
    run = tmp_path / "run"
    trained = run_cli("train", "--dataset", "folder", "--data-dir", data, "--image-size", 16,
                      "--batch-size", 4, "--max-steps", 2, "--num-samples", 2, "--sample-steps",
                      1, "--condition", "class", "--lr-schedule", "constant",  # 2 full steps
                      "--output", run, *TINY)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    common = ["eval", "fid", "--checkpoint", run, "--inception-weights", weights, "--cache-dir",
              tmp_path / "cache", "--num-samples", 6, "--batch-size", 6, "--solver", "euler",
              "--steps", 2]  # fmt: skip

    def record(*extra):
        out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
        result = run_cli(*common, *extra, "--json", out)
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text()), result.output

    default, output = record()
    assert default["conditions"] == {"kind": "class", "sampling": "data", "guidance": 1.5,
                                     "guidance_interval": [0.2, 0.8], "data_rows": 16}  # fmt: skip
    assert "class data, guidance 1.5 at 0.2..0.8" in output
    red, _ = record("--cond", "class=red", "--guidance", 3, "--guidance-interval", "0,1")
    assert red["conditions"]["sampling"] == "fixed" and red["conditions"]["fixed"] == {
        "class": "red"
    }
    assert red["conditions"]["guidance"] == 3 and red["conditions"]["guidance_interval"] == [0, 1]
    blue, _ = record("--cond", "class=blue", "--guidance", 3, "--guidance-interval", "0,1")
    assert blue["fid"] != red["fid"]  # the backbone saw the class asked for
    uniform, _ = record("--cond-sampling", "uniform")
    assert uniform["conditions"]["sampling"] == "uniform"
    # The draws themselves: the data's frequencies (3:1), or uniform.
    generator = Generator.load(run)
    source = {"dataset": "folder", "data_dir": str(data), "split": "train", "options": {}}
    plan = plan_conditions(generator, cond=None, sampling=None, guidance=None, interval=None,
                           data=source)  # fmt: skip
    red_index = generator.data.condition.names.index("red")
    drawn = plan.draw(4000, seed=0)["class"]
    assert abs((drawn == red_index).float().mean().item() - 0.75) < 0.03
    assert torch.equal(drawn, plan.draw(4000, seed=0)["class"])  # seeded
    plan = plan_conditions(generator, cond=None, sampling="uniform", guidance=None,
                           interval=None, data=None)  # fmt: skip
    assert abs((plan.draw(4000, seed=0)["class"] == red_index).float().mean().item() - 0.5) < 0.03


class MeanShift:
    """A test plugin's metric: the distance between the samples' and the reference's mean
    features (no covariance), declared on Inception features."""

    @staticmethod
    def factory():
        from fmkit.metrics import Metric

        class Shift(Metric):
            columns = ("mean_shift",)

            def compute(self, features, reference):
                return {"mean_shift": (features.mean(0) - reference.mu).norm().item()}

            def line(self, results):
                return f"mean shift {results['mean_shift']:.4g}"

        return Shift()

    from fmkit import hookimpl

    @hookimpl
    def register_metrics(self, register):
        register("mean_shift", self.factory)


def test_a_metric_plugin_works_through_eval_fid_and_sweep(weights, faces, tmp_path, run_cli,
                                                          register_plugin):  # fmt: skip
    """Metrics are an open plugin kind: `--metrics` reaches a plugin's, in the record, the
    result line and the sweep table."""
    register_plugin(MeanShift(), "mean-shift-plugin")
    run = tmp_path / "run"
    trained = run_cli("train", "--dataset", "folder", "--data-dir", faces, "--image-size", 16,
                      "--batch-size", 4, "--max-steps", 1, "--num-samples", 2, "--output", run,
                      *TINY)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    common = ["--checkpoint", run, "--inception-weights", weights, "--cache-dir",
              tmp_path / "cache", "--num-samples", 4, "--batch-size", 4, "--metrics",
              "fid,mean_shift"]  # fmt: skip
    result = run_cli("eval", "fid", *common, "--solver", "euler", "--steps", 2, "--json",
                     tmp_path / "r.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["metrics"] == ["fid", "mean_shift"] and record["mean_shift"] > 0
    assert "mean shift " in result.output
    sweep = run_cli("eval", "sweep", *common, "--solvers", "euler:2", "--out", tmp_path / "sw")
    assert sweep.exit_code == 0, sweep.output
    assert "| solver | mean NFE | fid | mean_shift |" in (tmp_path / "sw" / "sweep.md").read_text()
    line = one_line_error(run_cli("eval", "fid", *common[:-1], "fid,shift"))
    assert "unknown metric 'shift'" in line and "mean_shift" in line
