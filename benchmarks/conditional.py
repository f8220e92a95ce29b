"""Conditional generation: how well a model obeys conditions under classifier-free guidance,
what it costs, and which condition-dropout rates to default to.

    python benchmarks/conditional.py --part class --steps 1500
    python benchmarks/conditional.py --part attributes --steps 1500 --recipes default,attr0.3
    python benchmarks/conditional.py --part cost

class       scikit-learn's digits (shipped offline): a class-conditional and an unconditional
            UNet trained for the same steps; samples asked for each digit are judged by
            quality.py's held-out classifier (fraction of the requested class) and scored by
            the Fréchet distance in its features, at several guidance weights and intervals.
attributes  a synthetic set whose 16x16 images carry four independent, visible binary
            attributes with unequal frequencies; a classifier trained on fresh synthetic images
            judges each attribute. For each attribute set on or off (the rest unspecified):
            agreement on it, and how far the unspecified ones drift from the data's frequency.
cost        training images/s with and without conditions (median of back-to-back pairs), and
            the NFE of guided against unguided sampling.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from fmkit import Condition, DataSpec, Generator
from fmkit.config import TrainConfig
from fmkit.options import parse_options
from fmkit.prepared import write_array
from fmkit.solver import build_solver
from fmkit.train import train

import quality  # a sibling script: benchmarks/ is on sys.path when run
import train_step

SIZE = 16
ATTRIBUTES = ("light_background", "red_square", "right", "big")
FREQUENCY = (0.3, 0.5, 0.7, 0.4)  # P(attribute = 1) in the synthetic data
RECIPES = {  # flow-matching objective options per recipe
    "default": {},
    "attr0.3": {"attribute_dropout": 0.3},
    "attr0.5": {"attribute_dropout": 0.5},
    "attr0": {"attribute_dropout": 0.0, "cond_dropout": 0.2},
}
GUIDANCE = [(w, (0.0, 1.0)) for w in (0.0, 1.0, 1.25, 1.5, 2.0, 4.0)]
GUIDANCE += [(w, (0.2, 0.8)) for w in (1.5, 2.0, 4.0)] + [(2.0, (0.5, 1.0)), (2.0, (0.0, 0.5))]
ATTRIBUTE_GUIDANCE = [(1.0, (0.0, 1.0)), (1.5, (0.2, 0.8)), (2.0, (0.0, 1.0)), (3.0, (0.0, 1.0))]
ATTRIBUTE_GUIDANCE += [(3.0, (0.2, 0.8))]


def run_training(
    data: Path, out: Path, steps: int, condition: str, objective_opts: dict, backbone: dict
) -> Path:
    cfg = TrainConfig(
        **{
            **quality.BASE,
            "backbone_opts": {**quality.BASE["backbone_opts"], **backbone},
            "data_dir": str(data),
            "output": str(out),
            "max_steps": steps,
            "condition": condition,
            "objective_opts": objective_opts,
        }
    )
    torch.set_num_threads(1)
    return train(cfg, progress=False)


def _train_job(args):
    return run_training(*args)


def train_all(jobs: list[tuple], parallel: int) -> list[Path]:
    done = {job[1]: job[1] / "checkpoint_final.safetensors" for job in jobs}
    jobs = [job for job in jobs if not done[job[1]].is_file()]  # kept from an earlier run
    if jobs:
        _train_missing(jobs, parallel)
    return list(done.values())


def _train_missing(jobs: list[tuple], parallel: int) -> list[Path]:
    if parallel > 1:
        with multiprocessing.get_context("spawn").Pool(parallel) as pool:
            return pool.map(_train_job, jobs)
    return [_train_job(job) for job in jobs]


def part_class(work: Path, steps: int, samples: int, parallel: int, backbone: dict) -> None:
    images, labels = quality.digits()
    (gen_x, gen_y), _, _ = quality.split(images, labels)
    quality.write_training_set(gen_x, work / "digits", gen_y)
    cond_ckpt, free_ckpt = train_all(
        [
            (work / "digits", work / "cond", steps, "class", {}, backbone),
            (work / "digits", work / "free", steps, "none", {}, backbone),
        ],
        parallel,
    )
    scorer = quality.Scorer(samples)
    classifier = scorer.classifier
    floor_x, floor_y = images[1400:], labels[1400:]
    with torch.no_grad():
        ceiling = (classifier(floor_x).argmax(1) == floor_y).float().mean().item()
    solver = build_solver("euler", steps=20)
    wanted = [{"class": d % 10} for d in range(samples)]  # balanced over the ten digits
    print(f"\n## Class control: digits, {steps} steps, {samples} samples, Euler 20\n")
    print(f"classifier accuracy on held-out real digits: {100 * ceiling:.1f}%\n")
    print("| model | guidance | interval | correct class | Fréchet distance | NFE |")
    print("| --- | --- | --- | --- | --- | --- |")
    free = Generator.load(free_ckpt).sample(samples, solver=solver, seed=1, batch_size=samples)
    fd = scorer.distance(free.images)
    print(f"| unconditional | — | — | — | {fd:.1f} | {free.nfe[0]} |")
    model = Generator.load(cond_ckpt)
    target = torch.tensor([w["class"] for w in wanted])
    for w, interval in GUIDANCE:
        out = model.sample(samples, cond=wanted, solver=solver, seed=1, batch_size=samples,
                           guidance=w, interval=interval)  # fmt: skip
        correct = classifier(out.images.clamp(-1, 1).mean(1, keepdim=True)).argmax(1) == target
        fd = scorer.distance(out.images)
        print(
            f"| class-conditional | {w:g} | {interval[0]:g}–{interval[1]:g} | "
            f"{100 * correct.float().mean():.1f}% | {fd:.1f} | {out.nfe[0]} |",
            flush=True,
        )


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) images in [-1, 1] and their (n, 4) attributes (see ATTRIBUTES)."""
    g = torch.Generator().manual_seed(seed)
    attrs = (torch.rand(n, 4, generator=g) < torch.tensor(FREQUENCY)).long()
    images = torch.empty(n, 3, SIZE, SIZE)
    for i, (light, red, right, big) in enumerate(attrs.tolist()):
        images[i] = 0.6 if light else -0.6  # background
        side = 8 if big else 4
        top = int(torch.randint(0, SIZE - side + 1, (), generator=g))
        half = SIZE // 2
        left = (half if right else 0) + int(torch.randint(0, half - side + 1, (), generator=g))
        colour = torch.tensor([1.0, -1.0, -1.0] if red else [-1.0, -1.0, 1.0])
        images[i, :, top : top + side, left : left + side] = colour[:, None, None]
    images += 0.05 * torch.randn(images.shape, generator=g)
    return images.clamp(-1, 1), attrs


class AttributeNet(nn.Module):
    """Four binary logits, one per attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 4),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def attribute_classifier() -> AttributeNet:
    torch.manual_seed(0)
    x, y = synthetic(4000, seed=1)
    model = AttributeNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_x, test_y = synthetic(1000, seed=2)
    with torch.no_grad():
        accuracy = ((model(test_x) > 0).long() == test_y).float().mean(0)
    print(f"attribute classifier accuracy on fresh images: {accuracy.tolist()}")
    return model.eval()


def write_attribute_set(out: Path, n: int = 2000) -> None:
    images, attrs = synthetic(n, seed=0)

    class Shapes:
        labels = attrs

        def __len__(self):
            return n

        def __getitem__(self, i):
            return images[i], attrs[i]

        def describe(self):
            return DataSpec(3, SIZE, Condition("attributes", ATTRIBUTES))

    write_array(Shapes(), out, {"dataset": "synthetic shapes"}, progress=False)


def part_attributes(
    work: Path, steps: int, samples: int, recipes: list[str], parallel: int, backbone: dict
):
    write_attribute_set(work / "shapes")
    jobs = [(work / "shapes", work / r, steps, "attributes", RECIPES[r], backbone) for r in recipes]
    checkpoints = train_all(jobs, parallel)
    judge = attribute_classifier()
    solver = build_solver("euler", steps=20)
    print(f"\n## Attribute control: synthetic shapes, {steps} steps, {samples} samples each\n")
    print("| recipe | guidance | interval | worst agreement on the set attribute | mean | "
          "worst drift of an unspecified one (points) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for recipe, ckpt in zip(recipes, checkpoints, strict=True):
        model = Generator.load(ckpt)
        free = model.sample(samples, solver=solver, seed=1, batch_size=samples)
        with torch.no_grad():
            seen = (judge(free.images) > 0).float().mean(0)  # (4,)
        drift = max(abs(seen[b].item() - FREQUENCY[b]) * 100 for b in range(len(ATTRIBUTES)))
        print(f"| {recipe} {RECIPES[recipe]} | nothing set | — | — | — | {drift:.1f} |")
        for w, interval in ATTRIBUTE_GUIDANCE:
            agreement, drift = [], []
            for a, value in itertools.product(range(len(ATTRIBUTES)), (0, 1)):
                out = model.sample(samples, cond={ATTRIBUTES[a]: value}, solver=solver,
                                   seed=1, batch_size=samples, guidance=w, interval=interval)  # fmt: skip
                with torch.no_grad():
                    seen = (judge(out.images) > 0).float()  # (N, 4)
                agreement.append((seen[:, a] == value).float().mean().item())
                for b in range(len(ATTRIBUTES)):
                    if b != a:
                        drift.append(abs(seen[:, b].mean().item() - FREQUENCY[b]) * 100)
            print(
                f"| {recipe} {RECIPES[recipe]} | {w:g} | {interval[0]:g}–{interval[1]:g} | "
                f"{100 * min(agreement):.1f}% | "
                f"{100 * statistics.mean(agreement):.1f}% | {max(drift):.1f} |",
                flush=True,
            )


def part_cost(work: Path) -> None:
    write_attribute_set(work / "shapes")
    settings = train_step.Settings(steps=40, warmup=10, batch_size=64, image_size=SIZE,
                                   unet=dict(quality.BASE["backbone_opts"]))  # fmt: skip
    ratios = []
    for r in range(5):
        times = {}
        for condition in ("none", "attributes"):
            cfg_changes = {"condition": condition}
            times[condition] = fmkit_rate(train_step, work / "shapes", work / f"c{r}{condition}",
                                          settings, cfg_changes)  # fmt: skip
        ratios.append(times["none"] / times["attributes"])
    print("\n## Cost\n")
    print(f"training step time, conditional / unconditional (median of 5 pairs): "
          f"{statistics.median(ratios):.3f} (pairs {', '.join(f'{x:.3f}' for x in ratios)})")  # fmt: skip
    model = Generator.load(work / "c0attributes")
    solver = build_solver("euler", steps=20)
    plain = model.sample(8, cond={"big": 1}, solver=solver, guidance=1.0).nfe[0]
    guided = model.sample(8, cond={"big": 1}, solver=solver, guidance=2.0, interval=(0, 1))
    guided = guided.nfe[0]
    limited = model.sample(8, cond={"big": 1}, solver=solver)  # the default: w 1.5 in 0.2-0.8
    print(f"NFE at Euler 20: unguided {plain}, guided {guided} ({guided / plain:.2f}x), "
          f"default (w 1.5 in t 0.2–0.8) {limited.nfe[0]} ({limited.nfe[0] / plain:.2f}x)")  # fmt: skip


def fmkit_rate(train_step, data: Path, out: Path, s, changes: dict) -> float:
    """images/s of `fmkit train` after warm-up, as train_step.fmkit_loop measures it."""
    import json

    cfg = TrainConfig(
        dataset="prepared", data_dir=str(data), image_size=s.image_size, batch_size=s.batch_size,
        max_steps=s.warmup + s.steps, backbone_opts=dict(s.unet), log_every=s.warmup,
        save_every=None, sample_every=None, num_samples=1, sample_steps=1, output=str(out),
        device="cpu", **changes,
    )  # fmt: skip
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > s.warmup]
    return statistics.mean(r["images_per_s"] for r in timed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="class,attributes,cost")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--recipes", default="default", help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument(
        "--backbone-opt", action="append", default=[], help="UNet option KEY=VALUE (repeatable)"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the trained models here; models already there are reused"
    )
    args = parser.parse_args(argv)
    backbone = parse_options(args.backbone_opt, "--backbone-opt")
    print(
        f"# {platform.machine()}, one torch thread per training, UNet {quality.BASE['backbone_opts']}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        parts = args.part.split(",")
        if "class" in parts:
            part_class(work, args.steps, args.samples, args.parallel, backbone)
        if "attributes" in parts:
            part_attributes(
                work, args.steps, args.samples // 2, args.recipes.split(","), args.parallel,
                backbone,
            )  # fmt: skip
        if "cost" in parts:
            part_cost(work)


if __name__ == "__main__":
    main()
