"""Post-hoc EMA on the command line: `fmkit ema` reconstructs a run's EMA at chosen relative
widths as model folders, `fmkit eval ema` scores widths with any metric and says which is best.
The reconstruction is fmkit.phema's."""

from __future__ import annotations

from pathlib import Path

import click

from fmkit import checkpoint
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim, write_json
from fmkit.phema import Reconstruction, parse_widths, reconstruct

EMA_MODELS = FolderKind(
    "ema", "post-hoc EMA models", "fmkit ema", allowed=("sigma_rel-*", "ema.json")
)
EMA_SWEEP = FolderKind("ema-sweep", "a post-hoc EMA sweep", "fmkit eval ema")

run_option = click.option(
    "--run",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A training run folder with post-hoc EMA snapshots (RUN/phema/).",
)
widths_option = click.option(
    "--sigma-rel",
    "widths",
    required=True,
    metavar="SIGMA,...",
    help="Relative EMA widths to reconstruct, comma-separated (EDM2's sigma_rel: the "
    "profile's std over its mean age; training stores 0.05 and 0.10).",
)
step_option = click.option(
    "--step",
    type=click.IntRange(min=1),
    help="Reconstruct the EMA as it was after this step [default: the last snapshot].",
)


def widths_of(text: str) -> tuple[float, ...]:
    widths = parse_widths(text)
    if not widths:
        raise FmkitError("--sigma-rel needs at least one width, e.g. 0.05,0.1,0.15")
    return widths


def folder_name(width: float) -> str:
    return f"sigma_rel-{width:.3f}"


def described(rec: Reconstruction) -> str:
    return (
        f"sigma_rel {rec.sigma_rel:.3f} (gamma {rec.gamma:.2f}) at step {rec.step}: "
        f"{len(rec.coefficients)} stored profiles, weighting error {100 * rec.error:.2f}%"
    )


@click.command("ema")
@run_option
@widths_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@step_option
def ema_command(run: Path, widths: str, out: Path, step: int | None) -> None:
    """Reconstruct a run's EMA at any relative width after training (post-hoc EMA, Karras et
    al. 2024), from the profiles it stored: one model folder per width in OUT
    (OUT/sigma_rel-0.100/, what `fmkit sample`, `eval`, `export` and `demo` read).

    Example: fmkit ema --run results --sigma-rel 0.05,0.1,0.15 --out results-ema
    """
    from fmkit.export import export
    from fmkit.generator import Generator
    from fmkit.plugins import registry

    chosen = widths_of(widths)
    kind = registry("exporters").build("fmkit", {}).folder
    parent = claim(out, EMA_MODELS)  # every folder checked before anything is written
    targets = {w: out / folder_name(w) for w in chosen}
    for target in targets.values():
        claim(target, kind)
    recs = reconstruct(run, chosen, step)
    generator = Generator.load(checkpoint.resolve(run))  # the run's model, for its spec
    record = []
    for rec in recs:
        generator.module.load_state_dict(rec.state)
        parent.add(folder_name(rec.sigma_rel))
        export(generator, targets[rec.sigma_rel], "fmkit")
        click.echo(f"{targets[rec.sigma_rel]}: {described(rec)}")
        record.append(record_of(rec, targets[rec.sigma_rel]))
    parent.add("ema.json")
    write_json(out / "ema.json", {"run": str(run.resolve()), "models": record})


def record_of(rec: Reconstruction, folder: Path | None = None) -> dict:
    entry = {
        "sigma_rel": rec.sigma_rel,
        "gamma": rec.gamma,
        "step": rec.step,
        "weighting_error": rec.error,
    }
    if folder is not None:
        entry["folder"] = str(folder)
    return entry
