"""`fmkit eval`: FID/KID/precision-recall (`fid`), a solver sweep (`sweep`), post-hoc EMA
widths (`ema`) and bits/dim (`nll`) of a trained model; the work is in fmkit.evaluate,
fmkit.report and fmkit.phema."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fmkit import config
from fmkit.cli_ema import EMA_SWEEP, record_of, step_option, widths_of, widths_option
from fmkit.conditions import parse_conditions
from fmkit.device import resolve_device
from fmkit.errors import FmkitError
from fmkit.evaluate import (
    COND_SAMPLING,
    check_record_file,
    evaluate_solver,
    metric,
    result_line,
    setup,
)
from fmkit.flags import (
    accelerate,
    checkpoint_option,
    cond_option,
    device_option,
    ema_option,
    guidance_options,
    network_options,
    opt_flag,
    parse_interval,
    seed_option,
    solver_flags,
)
from fmkit.folders import claim, write_json
from fmkit.generator import Generator
from fmkit.inception import WEIGHTS_ENV
from fmkit.options import parse_options
from fmkit.phema import reconstruct
from fmkit.report import SWEEP, nll_report, write_sweep
from fmkit.sampling import ChosenSolver
from fmkit.solver import build_solver, parse_solver_spec


@click.group("eval")
def eval_group() -> None:
    """Measure a checkpoint: FID/KID/precision-recall, a solver sweep, or bits/dim."""


def _eval_options(func):
    options = [
        checkpoint_option,
        click.option("--dataset", help="Reference dataset [default: the checkpoint's]."),
        click.option("--data-dir", help="Reference dataset root [default: the checkpoint's]."),
        click.option("--split", default="train", show_default=True, help="Reference split."),
        opt_flag("dataset", "Reference dataset option [default: the checkpoint's, e.g. its crop]."),
        click.option("--num-samples", default=50000, show_default=True, type=click.IntRange(2)),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1)),
        seed_option(),
        ema_option,
        click.option(
            "--metrics",
            default="fid",
            show_default=True,
            help="Comma-separated registered metrics (fmkit list metrics): fid, kid, prc, ...",
        ),
        click.option(
            "--reference-stats",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Statistics file to use instead of computing one (fmkit's, or a pytorch-fid/"
            "clean-fid .npz).",
        ),
        click.option(
            "--max-reference-images",
            type=click.IntRange(2),
            help="Use at most N reference images [default: all].",
        ),
        click.option(
            "--inception-weights",
            type=click.Path(path_type=Path),
            help=f"Local Inception weights file [env {WEIGHTS_ENV}].",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Reference statistics cache [default: ~/.cache/fmkit/fid].",
        ),
        device_option,
        network_options(many_batches=True),
        cond_option,
        click.option(
            "--cond-sampling",
            type=click.Choice(COND_SAMPLING),
            help="A conditional model's conditions: drawn from the reference data's labels (its "
            "class frequencies, its attributes' joint distribution), or from the kind's few "
            "states uniformly (classes) [default: data].",
        ),
        guidance_options,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _setup(common: dict):
    ev = setup(
        common["ckpt"],
        ema=common["ema"],
        metrics=common["metrics"],
        dataset=common["dataset"],
        data_dir=common["data_dir"],
        split=common["split"],
        dataset_opts=config.dataset_options(parse_options(common["dataset_opts"], "--dataset-opt")),
        reference_stats=common["reference_stats"],
        max_reference_images=common["max_reference_images"],
        inception_weights=common["inception_weights"],
        cache_dir=common["cache_dir"],
        device=resolve_device(common["device"]),
        cond=parse_conditions(common["conds"], "--cond") if common["conds"] else None,
        cond_sampling=common["cond_sampling"],
        guidance=common["guidance"],
        interval=parse_interval(common["guidance_interval"]),
    )
    accelerate(ev.generator, common["precision"], common["compile_network"], many_batches=True)
    return ev


@eval_group.command("fid")
@_eval_options
@solver_flags
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON record here.",
)
def eval_fid(solver, steps, solver_opts, json_out, **common):
    """FID (and --metrics kid,prc) of generated samples against reference statistics, with the
    model's own sampler unless --solver says otherwise.

    Example: fmkit eval fid --checkpoint results --solver dopri5 --num-samples 50000
    """
    if json_out is not None:
        check_record_file(json_out)  # refused before the evaluation, not after
    ev = _setup(common)
    chosen = ev.generator.defaults.solver_for(
        solver, steps, parse_options(solver_opts, "--solver-opt")
    )
    record = evaluate_solver(
        ev, chosen.spec, chosen.solver, chosen.options, common["num_samples"],
        common["batch_size"], common["seed"],
    )  # fmt: skip
    click.echo(result_line(record))
    click.echo(json.dumps(record, indent=2))
    if json_out:
        write_json(json_out, record)


@eval_group.command("sweep")
@_eval_options
@click.option(
    "--solvers",
    default="euler:10,euler:25,euler:100,midpoint:10,rk4:5,dopri5",
    show_default=True,
    help="NAME[:STEPS[:KEY=VALUE...]] list.",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default="sweep", show_default=True
)
def eval_sweep(solvers, out, **common):
    """Evaluate several solver settings; writes sweep.md, sweep.json and sweep.png (quality vs NFE)."""
    claim(out, SWEEP)  # a folder it may not write is refused before the evaluation
    ev = _setup(common)
    records = []
    for spec in solvers.split(","):
        name, steps, options = parse_solver_spec(spec)
        built = build_solver(name, steps=steps, options=options)
        record = evaluate_solver(
            ev, spec.strip(), built, options, common["num_samples"], common["batch_size"],
            common["seed"],
        )  # fmt: skip
        click.echo(result_line(record))
        records.append(record)
    write_sweep(records, ev.metrics, out)
    click.echo(f"wrote {out}/sweep.md, sweep.json, sweep.png")


@eval_group.command("ema")
@_eval_options
@solver_flags
@widths_option
@step_option
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default="ema-sweep",
    show_default=True,
)  # fmt: skip
def eval_ema(solver, steps, solver_opts, widths, step, out, **common):
    """Score post-hoc EMA widths of a training run (see `fmkit ema`) and the run's own EMA
    with --metrics, at one solver setting, and say which is best (by the first metric);
    writes ema.json and ema.md. --checkpoint is the run folder.

    Example: fmkit eval ema --checkpoint results --sigma-rel 0.05,0.1,0.15,0.2 --num-samples 10000
    """
    chosen = widths_of(widths)
    folder = claim(out, EMA_SWEEP)  # refused before the evaluation
    run = Path(common["ckpt"])
    if not run.is_dir():
        raise FmkitError(f"--checkpoint {run}: fmkit eval ema takes a run folder (with phema/)")
    recs = reconstruct(run, chosen, step)
    ev = _setup(common)
    picked = ev.generator.defaults.solver_for(
        solver, steps, parse_options(solver_opts, "--solver-opt")
    )

    def scored(label: str, extra: dict) -> dict:
        record = evaluate_solver(
            ev, picked.spec, picked.solver, picked.options, common["num_samples"],
            common["batch_size"], common["seed"],
        )  # fmt: skip
        click.echo(f"{label}: {result_line(record)}")
        return {"weights": label, **extra, **record}

    own = "the run's EMA" if common["ema"] else "the run's raw weights"
    records = [scored(own, {})]
    for rec in recs:
        ev.generator.module.load_state_dict(rec.state)
        records.append(scored(f"sigma_rel {rec.sigma_rel:.3f}", record_of(rec)))
    first = metric(ev.metrics[0])
    key = first.columns[0]
    pick = min if first.better == "lower" else max
    best = pick(records, key=lambda r: r[key])
    folder.add("ema.json", "ema.md")
    write_json(out / "ema.json", {"best": best["weights"], "records": records})
    (out / "ema.md").write_text(_ema_table(records, ev.metrics, best))
    click.echo(f"best: {best['weights']} ({key} {best[key]:.4g}; {own}: {records[0][key]:.4g})")


def _ema_table(records: list[dict], metrics: tuple[str, ...], best: dict) -> str:
    keys = [k for name in metrics for k in metric(name).columns]
    lines = ["| weights | weighting error | " + " | ".join(keys) + " |"]
    lines.append("|" + " --- |" * (len(keys) + 2))
    for r in records:
        error = f"{100 * r['weighting_error']:.2f}%" if "weighting_error" in r else "-"
        name = f"**{r['weights']}**" if r is best else r["weights"]
        lines.append(f"| {name} | {error} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


@eval_group.command("nll")
@checkpoint_option
@click.option("--dataset", help="[default: the checkpoint's]")
@click.option("--data-dir", help="[default: the checkpoint's]")
@click.option("--split", default="test", show_default=True)
@opt_flag("dataset")
@click.option("--num-images", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--solver", default="dopri5", show_default=True)
@opt_flag("solver")
@seed_option("Seeds the dequantisation and the trace estimator.")
@ema_option
@device_option
def eval_nll(
    ckpt, dataset, data_dir, split, dataset_opts, num_images, batch_size, solver, solver_opts,
    seed, ema, device,
):  # fmt: skip
    """Negative log-likelihood in bits/dim (uniform dequantisation; dopri5 + Hutchinson trace)."""
    options = parse_options(solver_opts, "--solver-opt")
    built = ChosenSolver(solver, build_solver(solver, options=options), options)
    generator = Generator.load(ckpt, ema=ema, device=resolve_device(device))
    report = nll_report(
        generator, ckpt, built, dataset=dataset, data_dir=data_dir, split=split,
        options=config.dataset_options(parse_options(dataset_opts, "--dataset-opt")),
        num_images=num_images, batch_size=batch_size, seed=seed, note=click.echo,
    )  # fmt: skip
    click.echo(
        f"{report['bits_per_dim']:.4f} bits/dim ± {report['stderr']:.4f} over {report['images']} "
        f"images ({report['solver']}, mean NFE {report['mean_nfe']:.1f})"
    )
    click.echo(json.dumps(report, indent=2))
