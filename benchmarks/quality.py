"""Quality per compute: train fmkit recipes for a fixed CPU budget on scikit-learn's 8x8 digits
(resized to 16x16, shipped offline with the package), sample with Euler at several step counts
and dopri5, and score samples by the Fréchet distance in the features of a small classifier
trained here on held-out real digits. The real-vs-real floor at the same sample size is printed
beside every score.

    python benchmarks/quality.py --minutes 30 --recipes default
    python benchmarks/quality.py --minutes 4 --recipes default,lr1e-4,lr1e-3,logit_normal,edm,wide
    python benchmarks/quality.py --minutes 10 --solvers euler:10,euler:10:schedule=shift:shift=3,ab2:10

Each recipe trains in its own process with one torch thread; --parallel N runs N at a time.
A --minutes budget is CPU time: 20 calibration steps measure CPU seconds per step
(time.process_time) and fix the step count. CPU time per step still grows when processes share
cores, so compare recipes at equal --max-steps; runs with the same steps are deterministic.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fmkit import Condition, DataSpec, checkpoint
from fmkit.config import TrainConfig
from fmkit.generator import Generator
from fmkit.metrics import feature_distance
from fmkit.phema import parse_widths, reconstruct
from fmkit.prepared import write_array
from fmkit.solver import solver_from_spec
from fmkit.train import train

SIZE = 16
BASE = dict(
    dataset="prepared",
    image_size=SIZE,
    batch_size=64,
    backbone_opts={"base_channels": 32, "channel_mult": (1, 2), "attn_resolutions": (8,)},
    save_every=None,
    sample_every=None,
    num_samples=16,
    sample_steps=20,
    log_every=50,
    device="cpu",
    hflip=False,  # digits are not mirror-symmetric, and the reference set is not flipped
)
RECIPES = {
    "default": {},
    "lr1e-4": {"lr": 1e-4},
    "lr1e-3": {"lr": 1e-3},
    "logit_normal": {"time_sampling": "logit_normal"},
    "edm": {"time_sampling": "edm"},
    "wide": {
        "backbone_opts": {"base_channels": 64, "channel_mult": (1, 2), "attn_resolutions": (8,)}
    },
    "no_dropout": {"backbone_opts": {**BASE["backbone_opts"], "dropout": 0.0}},
    "no_ema_warmup": {"ema_warmup": 0.0},
    "ema_warmup30": {"ema_warmup": 30.0},
    "ema_warmup100": {"ema_warmup": 100.0},
    "logit_normal_ema30": {"time_sampling": "logit_normal", "ema_warmup": 30.0},
    # The learning rate after warm-up (--lr-schedule), each named so a change of the default
    # does not change what it measures.
    "constant": {"lr_schedule": "constant"},
    "cosine": {"lr_schedule": "cosine"},
    "linear": {"lr_schedule": "linear"},
    # Where the model generates (--space): the same UNet on 2x2 patches (12 x 8 x 8).
    "patchify2": {"space": "patchify", "space_opts": {"factor": 2}},
}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 1, 16, 16) images in [-1, 1] and their labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    images = nn.functional.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return (images[order] * 2 - 1).clamp(-1, 1), torch.tensor(data.target)[order]


class Classifier(nn.Module):
    """A small CNN; its 64-wide penultimate layer is the feature space of the distance."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(images, labels, epochs: int = 40) -> Classifier:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def features(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    """(N, C, 16, 16) in [-1, 1] (C = 1 or 3) -> (N, 64)."""
    return model.features(images.clamp(-1, 1).mean(1, keepdim=True))


def split(images, labels):
    """Generator training set, classifier training set, floor set (disjoint)."""
    return (images[:900], labels[:900]), (images[900:1400], labels[900:1400]), images[1400:]


class Scorer:
    """The benchmark's distance: Fréchet distance, in the classifier's features, between
    generated images and the generator's training digits, with the real-vs-real floor at the
    same sample size and one fixed batch of noise that every model samples from."""

    def __init__(self, samples: int, classifier_epochs: int = 40) -> None:
        images, labels = digits()
        (gen_x, _), (cls_x, cls_y), floor_x = split(images, labels)
        self.classifier = train_classifier(cls_x, cls_y, classifier_epochs)
        self.reference = features(self.classifier, gen_x)  # (900, 64)
        self.n = min(samples, len(floor_x))
        self.floor = self.distance(floor_x[: self.n])
        # (n, 3, 16, 16), the same noise for every model and solver
        self.noise = torch.randn(self.n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))

    def distance(self, images: torch.Tensor) -> float:
        """(N, C, 16, 16) in [-1, 1] -> the distance to the training digits."""
        return feature_distance(features(self.classifier, images), self.reference)


def write_training_set(images: torch.Tensor, out: Path, labels: torch.Tensor | None = None):
    """A prepared array of the digits (as 3-channel images); with `labels`, also their
    classes "0".."9", so `--condition class` can train on them."""

    class Gray:  # a map-style dataset of (3, 16, 16) images, as fmkit's datasets yield
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            image = images[i].expand(3, SIZE, SIZE)
            return image if labels is None else (image, labels[i])

        def describe(self):
            names = tuple(str(d) for d in range(10)) if labels is not None else ()
            return DataSpec(3, SIZE, Condition("class", names) if names else Condition())

    Gray.labels = labels
    write_array(Gray(), out, {"dataset": "sklearn digits"}, progress=False)


def run_recipe(
    name: str,
    minutes: float,
    max_steps: int | None,
    samples: int,
    solvers: list[str],
    work: Path,
    classifier_epochs: int = 40,
    phema: tuple[float, ...] = (),
) -> dict:
    torch.set_num_threads(1)
    images, labels = digits()
    write_training_set(split(images, labels)[0][0], work / "data")
    overrides = RECIPES[name]
    cfg = dict(BASE, **overrides, data_dir=str(work / "data"), output=str(work / "calib"))
    if max_steps is None:  # calibrate: CPU seconds per step, then fill the budget
        start = time.process_time()
        train(TrainConfig(**{**cfg, "max_steps": 20}), progress=False)
        per_step = (time.process_time() - start) / 20
        max_steps = max(4, int(minutes * 60 / per_step))
    run = work / "run"
    every = max(1, max_steps // 3)
    start = time.process_time()
    train(
        TrainConfig(
            **{**cfg, "output": str(run), "max_steps": max_steps, "save_every_steps": every}
        ),
        progress=False,
    )
    train_cpu = time.process_time() - start

    scorer = Scorer(samples, classifier_epochs)

    def score(path, ema, solver, state=None):
        # "euler:20" or "euler:20:schedule=shift:shift=3": method, step count, solver options.
        model = Generator.load(path, ema=ema)
        if state is not None:  # other weights for the same model (a post-hoc EMA)
            model.module.load_state_dict(state)
        solution = model.generate(model.space.encode(scorer.noise), solver_from_spec(solver))
        images = model.space.decode(solution.x)  # the same noise in every space (lossless ones)
        return scorer.distance(images), solution.nfe

    final = run / "checkpoint_final.safetensors"
    result = {
        "recipe": name,
        "overrides": overrides,
        "steps": max_steps,
        "train_cpu_s": train_cpu,
        "floor": scorer.floor,
        "samples": scorer.n,
        "final": {},
        "checkpoints": [],
    }
    for solver in solvers:
        fd, nfe = score(final, True, solver)
        result["final"][solver] = {"fd": fd, "nfe": nfe}
    by_step = {
        checkpoint.read_metadata(p)["step"]: p for p in run.glob("checkpoint_step_*.safetensors")
    }
    by_step.setdefault(max_steps, final)
    for step, path in sorted(by_step.items()):
        ema_fd, _ = score(path, True, "euler:20")
        raw_fd, _ = score(path, False, "euler:20")
        result["checkpoints"].append({"step": step, "ema": ema_fd, "raw": raw_fd})
    if phema:  # post-hoc EMA widths at the end of the run, scored with every solver
        result["phema"] = []
        for rec in reconstruct(run, phema):
            scores = {s: score(final, True, s, rec.state)[0] for s in solvers}
            result["phema"].append({"sigma_rel": rec.sigma_rel, "error": rec.error, "fd": scores})
    return result


def _worker(args):
    *job, epochs, keep, phema = args
    if keep is not None:  # keep the run (its checkpoints and data) for later comparisons
        work = keep / f"{job[0]}-{job[2]}" if job[2] else keep / job[0]
        work.mkdir(parents=True, exist_ok=True)
        return run_recipe(*job, work, classifier_epochs=epochs, phema=phema)
    with tempfile.TemporaryDirectory() as tmp:
        return run_recipe(*job, Path(tmp), classifier_epochs=epochs, phema=phema)


def markdown(results: list[dict], solvers: list[str]) -> str:
    head = "| recipe | steps | train CPU s | " + " | ".join(f"{s} (NFE)" for s in solvers)
    head += " | raw euler:20 | floor | EMA ≤ raw at every checkpoint |"
    lines = [head, "|" + " --- |" * (len(solvers) + 6)]
    for r in results:
        cells = [f"{r['final'][s]['fd']:.2f} ({r['final'][s]['nfe']})" for s in solvers]
        raw = r["checkpoints"][-1]["raw"]
        ok = all(c["ema"] <= c["raw"] * 1.05 for c in r["checkpoints"])
        lines.append(
            f"| {r['recipe']} | {r['steps']} | {r['train_cpu_s']:.0f} | "
            + " | ".join(cells)
            + f" | {raw:.2f} | {r['floor']:.2f} | {'yes' if ok else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipes", default="default", help=f"comma-separated: {', '.join(RECIPES)}"
    )
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="CPU minutes of training per recipe"
    )
    parser.add_argument(
        "--max-steps", help="train exactly this many steps instead (a list: one run per count)"
    )
    parser.add_argument(
        "--phema",
        default="",
        help="post-hoc EMA widths (sigma_rel, comma-separated) to reconstruct at the end of "
        "each run and score with every solver, beside the run's own EMA",
    )
    parser.add_argument("--samples", type=int, default=256, help="generated images per score")
    parser.add_argument(
        "--solvers",
        default="euler:10,euler:20,euler:50,dopri5",
        help="comma-separated METHOD[:STEPS[:KEY=VALUE...]], e.g. euler:20:schedule=shift:shift=3",
    )
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="keep each recipe's run under KEEP/RECIPE")
    args = parser.parse_args(argv)
    solvers = args.solvers.split(",")
    phema = parse_widths(args.phema)
    budgets = [int(n) for n in args.max_steps.split(",")] if args.max_steps else [None]
    jobs = [
        (r, args.minutes, n, args.samples, solvers, args.classifier_epochs, args.keep, phema)
        for r in args.recipes.split(",")
        for n in budgets
    ]
    if args.parallel > 1:
        with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
            results = pool.map(_worker, jobs)
    else:
        results = [_worker(job) for job in jobs]
    print(
        f"# {platform.machine()}, 1 torch thread per recipe, budget "
        f"{args.max_steps or args.minutes} {'steps' if args.max_steps else 'CPU min'}, "
        f"Fréchet distance in classifier features, {results[0]['samples']} samples"
    )
    print(markdown(results, solvers))
    for r in results:
        dopri = r["final"].get("dopri5", {}).get("fd")
        eulers = sorted(  # plain uniform-grid Euler only
            (int(s.split(":")[1]), v["fd"])
            for s, v in r["final"].items()
            if s.startswith("euler:") and s.count(":") == 1
        )
        if dopri is not None:
            within = [n for n, fd in eulers if fd <= 1.1 * dopri]
            print(
                f"{r['recipe']}: smallest Euler step count within 10% of dopri5 "
                f"({dopri:.2f}): {within[0] if within else 'none of ' + str([n for n, _ in eulers])}"
            )
        print(
            f"{r['recipe']} checkpoints (step: EMA / raw at euler:20): "
            + ", ".join(f"{c['step']}: {c['ema']:.2f} / {c['raw']:.2f}" for c in r["checkpoints"])
        )
        if r.get("phema"):
            print(phema_table(r, solvers))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def phema_table(r: dict, solvers: list[str]) -> str:
    """The run's own EMA against each post-hoc width, per solver, and the best width."""
    lines = [f"{r['recipe']}, {r['steps']} steps: post-hoc EMA (distance per solver)"]
    lines.append("| weights | weighting error | " + " | ".join(solvers) + " |")
    lines.append("|" + " --- |" * (len(solvers) + 2))
    lines.append(
        "| the run's EMA | - | " + " | ".join(f"{r['final'][s]['fd']:.2f}" for s in solvers) + " |"
    )
    for p in r["phema"]:
        cells = " | ".join(f"{p['fd'][s]:.2f}" for s in solvers)
        lines.append(f"| sigma_rel {p['sigma_rel']:g} | {100 * p['error']:.2f}% | {cells} |")
    first = solvers[0]
    best = min(r["phema"], key=lambda p: p["fd"][first])
    own = r["final"][first]["fd"]
    lines.append(
        f"best at {first}: sigma_rel {best['sigma_rel']:g}, {best['fd'][first]:.2f} against "
        f"{own:.2f} ({100 * (1 - best['fd'][first] / own):+.1f}% lower)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
