"""Few-step generation on the quality benchmark's digits: a flow-matching model with Euler at
1-50 steps, the Adams-Bashforth multistep solver and the time-step schedules, dopri5; reflow
from that model (2-rectified flow), MeanFlow trained from scratch and flow-map students
distilled from it (`--objective distill`, each form), each at 1, 2, 4 and 8 steps.
Every score is the Fréchet distance in quality.py's classifier features (lower is better),
beside the real-vs-real floor, with the NFE and the training and pair-generation CPU time.

    python benchmarks/fewstep.py --steps 1200 --reflow-steps 600 --pairs 4096
    python benchmarks/fewstep.py --steps 1200 --pairs 0  # no reflow: teacher, MeanFlow, students
    python benchmarks/fewstep.py --steps 4 --reflow-steps 2 --pairs 16 --samples 16  # smoke

The flow-matching teacher and MeanFlow train side by side in two processes (one torch thread
each); then the teacher's dopri5 makes the reflow pairs and the reflow run starts from the
teacher's EMA weights, and so do the distilled students (`--distill-steps`, default the
teacher's own step count; `--distill-forms`). --keep DIR keeps every run, and reuses the ones
already there.
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

from fmkit import Generator
from fmkit.config import TrainConfig
from fmkit.reflow import write_pairs
from fmkit.solver import solver_from_spec
from fmkit.train import train

import quality  # a sibling script: benchmarks/ is on sys.path when run

TEACHER_SOLVERS = [f"euler:{n}:schedule=uniform" for n in (1, 2, 4, 8, 20, 50)]
TEACHER_SOLVERS += [
    f"{m}:{n}:schedule={s}"
    for m in ("euler", "ab2")
    for n in (1, 2, 4, 8, 20)
    for s in ("uniform", "shift", "edm")
    if (m, s) != ("euler", "uniform") and (n > 2 or (m, s) == ("ab2", "shift"))
]
TEACHER_SOLVERS += ["dopri5"]
FEW = [f"euler:{n}:schedule=uniform" for n in (1, 2, 4, 8)]


def config(work: Path, name: str, steps: int, **changes) -> TrainConfig:
    values = {**quality.BASE, "data_dir": str(work / "data"), "output": str(work / name)}
    values.update(max_steps=steps, **changes)
    return TrainConfig(**values)


def run(cfg: TrainConfig) -> tuple[Path, float]:
    """Train (unless the run is already complete) -> (final checkpoint, CPU seconds)."""
    final = Path(cfg.output) / "checkpoint_final.safetensors"
    spent = Path(cfg.output) / "cpu_seconds.json"
    if final.is_file() and spent.is_file():
        return final, json.loads(spent.read_text())
    torch.set_num_threads(1)
    start = time.process_time()
    train(cfg, progress=False)
    seconds = time.process_time() - start
    spent.write_text(json.dumps(seconds))
    return final, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1200, help="teacher and MeanFlow steps")
    parser.add_argument("--reflow-steps", type=int, default=600)
    parser.add_argument("--pairs", type=int, default=4096, help="reflow pairs (0: no reflow)")
    parser.add_argument(
        "--distill-steps", type=int, help="students' steps [default: the teacher's --steps]"
    )
    parser.add_argument("--distill-forms", default="lagrangian,eulerian")
    parser.add_argument(
        "--no-meanflow",
        dest="meanflow",
        action="store_false",
        help="do not train MeanFlow from scratch (e.g. its figures are an earlier run's)",
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--keep", type=Path, help="keep (and reuse) the runs here")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time (1 or 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = measure(work, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def measure(work: Path, args) -> dict:
    if not (work / "data" / "meta.json").is_file():
        images, labels = quality.digits()
        quality.write_training_set(quality.split(images, labels)[0][0], work / "data")
    jobs = [config(work, "flow_matching", args.steps)]
    if args.meanflow:
        jobs.append(
            config(
                work,
                "meanflow",
                args.steps,
                objective="meanflow",
                backbone_opts={**quality.BASE["backbone_opts"], "two_times": True},
            )  # fmt: skip
        )
    if args.parallel > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
            trained = pool.map(run, jobs)
    else:
        trained = list(map(run, jobs))
    (teacher, teacher_cpu), *meanflow = trained

    forms = [f for f in args.distill_forms.split(",") if f]
    students = [
        config(
            work, f"distill-{form}", args.distill_steps or args.steps, objective="distill",
            objective_opts={"form": form}, init_from=str(teacher),
            backbone_opts={**quality.BASE["backbone_opts"], "two_times": True},
        )
        for form in forms
    ]  # fmt: skip
    if args.parallel > 1 and len(students) > 1:
        with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
            distilled = pool.map(run, students)
    else:
        distilled = list(map(run, students))

    if args.pairs:
        torch.set_num_threads(2)
        pairs = work / "pairs"
        start = time.process_time()
        write_pairs(
            Generator.load(teacher), pairs, args.pairs, solver_from_spec("dopri5"),
            {"teacher": str(teacher), "solver": "dopri5"}, batch_size=256, progress=False,
        )  # fmt: skip
        pairs_cpu = time.process_time() - start
        reflow_cfg = config(
            work, "reflow", args.reflow_steps, objective="reflow", dataset="prepared",
            data_dir=str(pairs), init_from=str(teacher), hflip=False,
        )  # fmt: skip
        reflowed, reflow_cpu = run(reflow_cfg)

    scorer = quality.Scorer(args.samples, args.classifier_epochs)

    def score(path: Path, spec: str) -> dict:
        solution = Generator.load(path).generate(scorer.noise, solver_from_spec(spec))
        return {"fd": scorer.distance(solution.x), "nfe": solution.nfe}

    results = {
        "steps": args.steps,
        "floor": scorer.floor,
        "samples": scorer.n,
        "models": {"flow matching": {"cpu_s": teacher_cpu, "scores": {}}},
    }
    models = [("flow matching", teacher, TEACHER_SOLVERS)]
    if meanflow:
        results["models"]["MeanFlow"] = {"cpu_s": meanflow[0][1], "scores": {}}
        models.append(("MeanFlow", meanflow[0][0], FEW))
    if args.pairs:
        results["models"]["reflow (2-RF)"] = {
            "cpu_s": reflow_cpu, "pairs_cpu_s": pairs_cpu, "pairs": args.pairs,
            "steps": args.reflow_steps, "scores": {},
        }  # fmt: skip
        models.append(("reflow (2-RF)", reflowed, FEW))
    for form, (path, cpu) in zip(forms, distilled, strict=True):
        name = f"distilled ({form})"
        results["models"][name] = {"cpu_s": cpu, "teacher_cpu_s": teacher_cpu, "scores": {}}
        models.append((name, path, FEW))
    for name, path, solvers in models:
        for spec in solvers:
            results["models"][name]["scores"][spec] = score(path, spec)
    print_table(results, args)
    return results


def print_table(results: dict, args) -> None:
    print(
        f"# {platform.machine()}, one torch thread per training; flow matching and MeanFlow "
        f"{args.steps} steps, reflow {args.reflow_steps} steps on {args.pairs} dopri5 pairs; "
        f"{results['samples']} samples, floor {results['floor']:.1f}\n"
    )
    print("| model | sampler | NFE | Fréchet distance | × floor |")
    print("| --- | --- | --- | --- | --- |")
    for name, model in results["models"].items():
        for spec, s in model["scores"].items():
            print(
                f"| {name} | {spec} | {s['nfe']} | {s['fd']:.1f} | {s['fd'] / results['floor']:.2f} |"
            )
    print()
    for name, model in results["models"].items():
        extra = ""
        if "pairs_cpu_s" in model:
            extra = f" (+ {model['pairs_cpu_s']:.0f} CPU s for {model['pairs']} pairs)"
        print(f"- {name}: {model['cpu_s']:.0f} CPU s of training{extra}")
    teacher = results["models"]["flow matching"]["scores"]
    dopri = teacher["dopri5"]["fd"]
    within = [
        (s["nfe"], spec) for spec, s in teacher.items() if spec != "dopri5" and s["nfe"] <= 20
        and s["fd"] <= 1.1 * dopri
    ]  # fmt: skip
    print(f"- fixed-step samplers within 10% of dopri5 ({dopri:.1f}) at <= 20 NFE: "
          f"{', '.join(spec for _, spec in sorted(within)) or 'none'}")  # fmt: skip
    if "reflow (2-RF)" in results["models"]:
        reflow4 = results["models"]["reflow (2-RF)"]["scores"][FEW[2]]["fd"]
        print(f"- reflow at 4 NFE / teacher dopri5: {reflow4 / dopri:.2f} (target <= 1.5)")
    ab2_4 = teacher["ab2:4:schedule=shift"]["fd"]
    for name, model in results["models"].items():
        if not name.startswith("distilled"):
            continue
        got = [model["scores"][spec]["fd"] for spec in FEW[:3]]
        print(
            f"- {name}: 1 NFE / dopri5 {got[0] / dopri:.2f} (target <= 2), 2 NFE / dopri5 "
            f"{got[1] / dopri:.2f} (target <= 1.3), 4 NFE {got[2]:.1f} vs the teacher's ab2 at "
            f"4 NFE {ab2_4:.1f} (target: lower); teacher + student "
            f"{model['teacher_cpu_s'] + model['cpu_s']:.0f} CPU s"
        )
    if "MeanFlow" not in results["models"]:
        return
    mf1 = results["models"]["MeanFlow"]["scores"][FEW[0]]["fd"]
    print(
        f"- MeanFlow at 1 NFE / teacher Euler 50: {mf1 / teacher['euler:50:schedule=uniform']['fd']:.2f} "
        "(target <= 2)"
    )


if __name__ == "__main__":
    main()
