"""The `fmkit` command line. Commands parse flags and call library code; logic lives elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fmkit.config import TrainConfig
from fmkit.data import build_dataset
from fmkit.distributed import from_environment
from fmkit.errors import FmkitError
from fmkit.evaluate import (
    BACKEND_MODE,
    RESIZE,
    WEIGHTS_ENV,
    backend_name,
    generate,
    load_inception,
    load_reference,
    reference,
    score,
)
from fmkit.flow import TIME_SAMPLING
from fmkit.options import check_options, describe_options, parse_options
from fmkit.plugins import KINDS, add_commands, list_plugins, registry
from fmkit.prepared import write_array
from fmkit.registry import unknown_name_message
from fmkit.report import bits_per_dim, write_sweep
from fmkit.sample import load_flow, sample_to_dir
from fmkit.solver import build_solver
from fmkit.train import resolve_device, train


class FmkitGroup(click.Group):
    """A click group that turns FmkitError into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FmkitError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=FmkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmkit")
def cli() -> None:
    """fmkit: train flow-matching image generators and sample from them.

    Backbones, datasets, probability paths and ODE solvers are plugins, chosen by name;
    `fmkit list` shows what is installed.
    """


@cli.command("plugins")
def plugins_command() -> None:
    """Print the loaded plugins (name, version, hooks) as JSON."""
    click.echo(json.dumps(list_plugins(), indent=2))


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(list(KINDS)))
def list_command(kind: str | None) -> None:
    """List registered components with a one-line description.

    KIND is one of backbones, datasets, paths, solvers; all of them when omitted.
    """
    for name in [kind] if kind else list(KINDS):
        reg = registry(name)
        if not kind:
            click.echo(f"{name}:")
        width = max((len(n) for n in reg.names()), default=0)
        for entry in reg:
            indent = "" if kind else "  "
            click.echo(f"{indent}{entry.name:<{width}}  {entry.description}".rstrip())


# What fmkit itself passes to each kind of factory (never a user option); see docs/writing-plugins.md.
_SHOW_FIXED = {"backbones": ("image_size", "channels"), "paths": (), "solvers": ()}


@cli.command("show")
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.argument("name")
@click.option(
    "--opt",
    "-o",
    "opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option to validate and build with.",
)
@click.option(
    "--image-size", default=64, show_default=True, type=click.IntRange(1), help="Backbones."
)
@click.option("--channels", default=3, show_default=True, type=click.IntRange(1), help="Backbones.")
def show_command(
    kind: str, name: str, opts: tuple[str, ...], image_size: int, channels: int
) -> None:
    """Describe one component: its plugin, options (type = default) and, for a backbone, its
    parameter count with the given options.

    Example: fmkit show backbones unet -o base_channels=128 --image-size 32
    """
    reg = registry(kind)
    entry = reg.get(name)
    options = parse_options(opts, "--opt")
    fixed_names = _SHOW_FIXED.get(kind, ("root", "image_size", "split"))
    built = None
    if kind in _SHOW_FIXED:  # cheap to build: do it, so every option value is checked
        fixed = {"image_size": image_size, "channels": channels} if kind == "backbones" else {}
        built = reg.build(name, options, **fixed)
    else:  # datasets read files when built: check the options only
        check_options(entry.factory, options, f"{reg.kind} '{name}'", dict.fromkeys(fixed_names))
    click.echo(f"{entry.name} ({reg.kind} from plugin {entry.plugin})")
    if entry.description:
        click.echo(f"  {entry.description}")
    click.echo("options:")
    for line in describe_options(entry.factory, skip=fixed_names):
        click.echo(f"  {line}")
    if kind == "backbones":
        count = sum(p.numel() for p in built.parameters())
        click.echo(f"parameters: {count:,} ({count / 1e6:.1f}M) at {image_size}x{image_size}")


def _opt_flag(kind: str):
    return click.option(
        f"--{kind}-opt",
        f"{kind}_opts",
        multiple=True,
        metavar="KEY=VALUE",
        help=f"Option for the {kind} (repeatable; see `fmkit show {kind}s NAME`).",
    )


_DEFAULTS = TrainConfig()


@cli.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with the same keys as the flags; flags override it.",
)
@click.option(
    "--backbone",
    default=_DEFAULTS.backbone,
    show_default=True,
    help="Registered backbone (fmkit list backbones).",
)
@click.option(
    "--dataset",
    default=_DEFAULTS.dataset,
    show_default=True,
    help="Registered dataset (fmkit list datasets).",
)
@click.option(
    "--path",
    "path_name",
    default=_DEFAULTS.path,
    show_default=True,
    help="Registered probability path.",
)
@_opt_flag("backbone")
@_opt_flag("dataset")
@_opt_flag("path")
@click.option("--data-dir", default=_DEFAULTS.data_dir, show_default=True, help="Dataset root.")
@click.option(
    "--image-size", default=_DEFAULTS.image_size, show_default=True, type=click.IntRange(1)
)
@click.option(
    "--batch-size",
    default=_DEFAULTS.batch_size,
    show_default=True,
    type=click.IntRange(1),
    help="Global batch: split over torchrun processes and --grad-accum micro-batches.",
)
@click.option(
    "--grad-accum",
    default=_DEFAULTS.grad_accum,
    show_default=True,
    type=click.IntRange(1),
    help="Micro-batches per optimizer step.",
)
@click.option("--epochs", default=_DEFAULTS.epochs, show_default=True, type=click.IntRange(1))
@click.option(
    "--max-steps", type=click.IntRange(1), help="Stop after N optimizer steps (overrides --epochs)."
)
@click.option(
    "--lr", default=_DEFAULTS.lr, show_default=True, type=click.FloatRange(0, min_open=True)
)
@click.option(
    "--warmup-steps", default=_DEFAULTS.warmup_steps, show_default=True, type=click.IntRange(0)
)
@click.option(
    "--grad-clip",
    default=_DEFAULTS.grad_clip,
    show_default=True,
    type=click.FloatRange(0),
    help="Max gradient norm (0: off).",
)
@click.option(
    "--ema-decay", default=_DEFAULTS.ema_decay, show_default=True, type=click.FloatRange(0, 1)
)
@click.option(
    "--ema-warmup",
    default=_DEFAULTS.ema_warmup,
    show_default=True,
    type=click.FloatRange(0),
    help="EMA decay ramp: update n uses min(--ema-decay, n / (n + W)); 0 turns it off.",
)
@click.option(
    "--time-sampling",
    default=_DEFAULTS.time_sampling,
    show_default=True,
    type=click.Choice(TIME_SAMPLING),
    help="Training times: uniform, logit_normal (--time-loc/--time-scale) or edm.",
)
@click.option(
    "--time-loc",
    default=_DEFAULTS.time_loc,
    show_default=True,
    type=float,
    help="logit_normal location.",
)
@click.option(
    "--time-scale",
    default=_DEFAULTS.time_scale,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="logit_normal scale.",
)
@click.option(
    "--save-every",
    default=_DEFAULTS.save_every,
    show_default=True,
    type=click.IntRange(0),
    help="Checkpoint every N epochs (0: off).",
)
@click.option(
    "--sample-every",
    default=_DEFAULTS.sample_every,
    show_default=True,
    type=click.IntRange(0),
    help="Sample grid every N epochs (0: off).",
)
@click.option("--save-every-steps", type=click.IntRange(1), help="Checkpoint every N steps.")
@click.option("--sample-every-steps", type=click.IntRange(1), help="Sample grid every N steps.")
@click.option(
    "--num-samples",
    default=_DEFAULTS.num_samples,
    show_default=True,
    type=click.IntRange(1),
    help="Images per grid.",
)
@click.option(
    "--sample-steps",
    default=_DEFAULTS.sample_steps,
    show_default=True,
    type=click.IntRange(1),
    help="Euler steps for grids.",
)
@click.option(
    "--log-every",
    default=_DEFAULTS.log_every,
    show_default=True,
    type=click.IntRange(1),
    help="Steps per metrics.jsonl line.",
)
@click.option("--output", default=_DEFAULTS.output, show_default=True, help="Run directory.")
@click.option("--seed", default=_DEFAULTS.seed, show_default=True, type=int)
@click.option(
    "--device",
    default=_DEFAULTS.device,
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
)
@click.option(
    "--num-workers",
    type=click.IntRange(0),
    help="DataLoader workers [default: 0 on the CPU, up to 8 per GPU].",
)
@click.option(
    "--cache-dataset/--no-cache-dataset",
    default=_DEFAULTS.cache_dataset,
    show_default=True,
    help="Decode image files once into a prepared array in $FMKIT_CACHE (~/.cache/fmkit).",
)
@click.option(
    "--precision",
    default=_DEFAULTS.precision,
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16"]),
)
@click.option(
    "--dist-timeout",
    default=_DEFAULTS.dist_timeout,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds a rank waits for the others under torchrun before failing.",
)
@click.option(
    "--compile/--no-compile",
    default=_DEFAULTS.compile,
    show_default=True,
    help="torch.compile the backbone.",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="NHWC memory format for the backbone [default: on CUDA only].",
)
@click.option(
    "--fused-adamw/--no-fused-adamw",
    default=None,
    help="One-kernel AdamW [default: on CUDA only].",
)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --output.")
@click.pass_context
def train_command(ctx: click.Context, config_file: Path | None, resume: bool, **flags) -> None:
    """Train a flow-matching model; writes checkpoints, sample grids and metrics to --output.

    Example: fmkit train --backbone unet --dataset celeba
    """
    values = _read_toml(config_file) if config_file else {}
    for name, value in flags.items():
        key = "path" if name == "path_name" else name
        given = ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        if key.endswith("_opts"):
            parsed = parse_options(value, f"--{key[:-5]}-opt")
            values[key] = {**values.get(key, {}), **parsed}
        elif given or key not in values:
            values[key] = value
    for key in ("save_every", "sample_every", "grad_clip"):
        if values.get(key) == 0:
            values[key] = None
    cfg = TrainConfig.from_dict(values)
    final = train(cfg, resume=resume, progress=True)
    if from_environment().is_main:
        click.echo(f"final checkpoint: {final}")


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FmkitError(f"{path}: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TrainConfig().to_dict()))
    if unknown:
        raise FmkitError(
            f"{path}: unknown key '{unknown[0]}'; keys are the train flags, e.g. batch_size"
        )
    return data


@cli.command("sample")
@click.option(
    "--checkpoint",
    "ckpt",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Checkpoint file, or a run directory (its newest checkpoint).",
)
@click.option(
    "--solver", default="euler", show_default=True, help="Registered solver (fmkit list solvers)."
)
@click.option(
    "--steps",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Steps of a fixed-step solver.",
)
@_opt_flag("solver")
@click.option("--num-samples", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights.")
@click.option(
    "--output",
    default="samples",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--trajectory",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Save a strip of K states from noise to image (K >= 2).",
)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
def sample_command(
    ckpt, solver, steps, solver_opts, num_samples, batch_size, seed, ema, output, trajectory, device
) -> None:
    """Generate images from a checkpoint with any ODE solver; prints the NFE of each batch.

    Example: fmkit sample --checkpoint results --solver dopri5
    """
    flow, cfg, _ = load_flow(ckpt, ema=ema, device=resolve_device(device))
    built = build_solver(solver, steps=steps, options=parse_options(solver_opts, "--solver-opt"))
    if built.adaptive:
        click.echo(f"note: {solver} is adaptive; --steps is ignored")
    report = sample_to_dir(
        flow,
        built,
        output,
        num_samples,
        batch_size,
        cfg.image_size,
        cfg.channels,
        seed,
        trajectory,
        click.echo,
    )
    click.echo(
        f"{report.images} images in {output}/ ({solver}, mean NFE {sum(report.nfe) / len(report.nfe):.1f}); "
        f"{report.seconds:.2f} s, {report.images / report.seconds:.1f} images/s"
    )


@cli.group("eval")
def eval_group() -> None:
    """Measure a checkpoint: FID/KID/precision-recall, a solver sweep, or bits/dim."""


def _eval_options(func):
    options = [
        click.option(
            "--checkpoint",
            "ckpt",
            required=True,
            type=click.Path(exists=True, path_type=Path),
            help="Checkpoint file or run directory.",
        ),
        click.option("--dataset", help="Reference dataset [default: the checkpoint's]."),
        click.option("--data-dir", help="Reference dataset root [default: the checkpoint's]."),
        click.option("--split", default="train", show_default=True, help="Reference split."),
        click.option(
            "--dataset-opt",
            "dataset_opts",
            multiple=True,
            metavar="KEY=VALUE",
            help="Reference dataset option [default: the checkpoint's, e.g. its crop].",
        ),
        click.option("--num-samples", default=50000, show_default=True, type=click.IntRange(2)),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1)),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--ema/--no-ema", default=True, show_default=True),
        click.option(
            "--metrics", default="fid", show_default=True, help="Comma-separated: fid, kid, prc."
        ),
        click.option(
            "--reference-stats",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Use this statistics file instead of computing or caching one.",
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
        click.option(
            "--device",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "cpu", "cuda"]),
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _quality_setup(
    *,
    ckpt,
    dataset,
    data_dir,
    split,
    dataset_opts,
    ema,
    metrics,
    reference_stats,
    max_reference_images,
    inception_weights,
    cache_dir,
    device,
    **_,
):
    device = resolve_device(device)
    flow, cfg, _ = load_flow(ckpt, ema=ema, device=device)
    wanted = tuple(m.strip() for m in metrics.split(",") if m.strip())
    unknown = sorted(set(wanted) - {"fid", "kid", "prc"})
    if unknown:
        raise FmkitError(f"unknown metric '{unknown[0]}'; available: fid, kid, prc")
    net = load_inception(inception_weights, device)
    if reference_stats is not None:
        ref = load_reference(reference_stats)
    else:
        options = (
            {k: v for k, v in cfg.dataset_opts.items() if k != "flip"} if dataset is None else {}
        )
        options.update(parse_options(dataset_opts, "--dataset-opt"))
        ref = reference(
            net,
            dataset or cfg.dataset,
            data_dir or cfg.data_dir,
            split,
            cfg.image_size,
            options,
            cache_dir,
            max_reference_images,
        )
    return flow, cfg, net, ref, wanted


@eval_group.command("fid")
@_eval_options
@click.option("--solver", default="dopri5", show_default=True)
@click.option(
    "--steps",
    default=100,
    show_default=True,
    type=click.IntRange(1),
    help="Steps of a fixed-step solver.",
)
@_opt_flag("solver")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the JSON record here.",
)
def eval_fid(solver, steps, solver_opts, json_out, **common):
    """FID (and --metrics kid,prc) of generated samples against reference statistics.

    Example: fmkit eval fid --checkpoint results --solver dopri5 --num-samples 50000
    """
    flow, cfg, net, ref, wanted = _quality_setup(**common)
    options = parse_options(solver_opts, "--solver-opt")
    built = build_solver(solver, steps=steps, options=options)
    record = _evaluate_one(flow, cfg, net, ref, wanted, solver, built, options, common)
    click.echo(_result_line(record))
    click.echo(json.dumps(record, indent=2))
    if json_out:
        json_out.write_text(json.dumps(record, indent=2))


def _evaluate_one(flow, cfg, net, ref, wanted, solver_name, solver, options, common) -> dict:
    num_samples, batch_size = common["num_samples"], common["batch_size"]
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    gen = generate(flow, solver, num_samples, batch_size, shape, common["seed"])
    results = score(net, gen.images, ref, wanted, batch_size)
    settings = dict(options)
    if not solver.adaptive:
        settings.setdefault("steps", getattr(solver, "steps", None))
    else:
        settings.update(rtol=getattr(solver, "rtol", None), atol=getattr(solver, "atol", None))
    return {
        **results,
        "num_samples": num_samples,
        "solver": solver_name,
        "solver_settings": settings,
        "mean_nfe": sum(gen.nfe) / len(gen.nfe),
        "wall_s": gen.seconds,
        "images_per_s": num_samples / gen.seconds,
        "reference": {**ref.description, "stats_file": str(ref.path), "cached": ref.cached},
        "backend": backend_name(),
        "mode": BACKEND_MODE,
        "inception": {
            "implementation": f"{backend_name()} {BACKEND_MODE}",
            "weights": net.weights_id,
            "resize": RESIZE,
        },
        "checkpoint": str(common["ckpt"]),
    }


def _result_line(r: dict) -> str:
    parts = [f"FID {r['fid']:.4g}"] if "fid" in r else []
    if "kid_mean" in r:
        parts.append(f"KID {r['kid_mean']:.4g} ± {r['kid_std']:.2g}")
    if "precision" in r:
        parts.append(f"precision {r['precision']:.3f}, recall {r['recall']:.3f}")
    ref = r["reference"]
    return (
        f"{', '.join(parts)} | {r['num_samples']} samples, {r['solver']} {r['solver_settings']}, "
        f"mean NFE {r['mean_nfe']:.1f}, {r['images_per_s']:.1f} img/s | reference "
        f"{ref.get('dataset')} {ref.get('split')} {ref.get('options', {})} {ref.get('image_size')}px"
    )


@eval_group.command("sweep")
@_eval_options
@click.option(
    "--solvers",
    default="euler:10,euler:25,euler:100,midpoint:10,rk4:5,dopri5",
    show_default=True,
    help="NAME[:STEPS] list.",
)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default="sweep", show_default=True
)
def eval_sweep(solvers, out, **common):
    """Evaluate several solver settings; writes sweep.md, sweep.json and sweep.png (quality vs NFE)."""
    flow, cfg, net, ref, wanted = _quality_setup(**common)
    records = []
    for spec in solvers.split(","):
        name, _, steps = spec.strip().partition(":")
        built = build_solver(name, steps=int(steps) if steps else None)
        record = _evaluate_one(flow, cfg, net, ref, wanted, spec.strip(), built, {}, common)
        click.echo(_result_line(record))
        records.append(record)
    write_sweep(records, wanted, out)
    click.echo(f"wrote {out}/sweep.md, sweep.json, sweep.png")


@eval_group.command("nll")
@click.option("--checkpoint", "ckpt", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", help="[default: the checkpoint's]")
@click.option("--data-dir", help="[default: the checkpoint's]")
@click.option("--split", default="test", show_default=True)
@click.option("--dataset-opt", "dataset_opts", multiple=True, metavar="KEY=VALUE")
@click.option("--num-images", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--solver", default="dopri5", show_default=True)
@_opt_flag("solver")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--ema/--no-ema", default=True, show_default=True)
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
def eval_nll(
    ckpt,
    dataset,
    data_dir,
    split,
    dataset_opts,
    num_images,
    batch_size,
    solver,
    solver_opts,
    seed,
    ema,
    device,
):
    """Negative log-likelihood in bits/dim (uniform dequantisation; dopri5 + Hutchinson trace)."""
    flow, cfg, _ = load_flow(ckpt, ema=ema, device=resolve_device(device))
    options = {k: v for k, v in cfg.dataset_opts.items() if k != "flip"} if dataset is None else {}
    options.update(parse_options(dataset_opts, "--dataset-opt"))
    data = build_dataset(
        dataset or cfg.dataset, data_dir or cfg.data_dir, cfg.image_size, split, options, flip=False
    )
    served = getattr(data, "split", split)
    if served is None:
        click.echo(
            f"note: dataset '{dataset or cfg.dataset}' has no splits; --split {split} is ignored "
            "and its images are scored as they are"
        )
    built = build_solver(solver, options=parse_options(solver_opts, "--solver-opt"))
    report = {**bits_per_dim(flow, data, built, num_images, batch_size, seed), "split": served}
    click.echo(
        f"{report['bits_per_dim']:.4f} bits/dim ± {report['stderr']:.4f} over {report['images']} images "
        f"({solver}, mean NFE {report['mean_nfe']:.1f})"
    )
    click.echo(json.dumps(report, indent=2))


class PrepareGroup(click.Group):
    """`fmkit prepare NAME`: any map-style registered dataset becomes a prepared array;
    plugins add their own subcommands (e.g. `prepare imagenet`), which take precedence."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(registry("datasets").names()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        datasets = registry("datasets")
        if name not in datasets:
            raise click.ClickException(unknown_name_message("dataset", name, datasets.names()))
        return _prepare_array_command(name)


@cli.group("prepare", cls=PrepareGroup)
def prepare_group() -> None:
    """Write a dataset once in a fast form: `fmkit prepare celeba|folder ... --out DIR` writes a
    memory-mapped uint8 array (train with --dataset prepared --data-dir DIR);
    `fmkit prepare imagenet` writes WebDataset shards."""


def _prepare_array_command(name: str) -> click.Command:
    @click.command(name)
    @click.option("--data-dir", default="./data", show_default=True, help="Where the dataset is.")
    @click.option("--image-size", default=64, show_default=True, type=click.IntRange(1))
    @click.option("--split", default="train", show_default=True)
    @click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory to write.",
    )
    @click.option(
        "--dataset-opt", "opts", multiple=True, metavar="KEY=VALUE", help="Dataset option."
    )
    def command(data_dir: str, image_size: int, split: str, out: Path, opts: tuple[str, ...]):
        options = parse_options(opts, "--dataset-opt")
        dataset = build_dataset(name, data_dir, image_size, split, options, flip=False)
        source = {
            "dataset": name,
            "data_dir": str(Path(data_dir).resolve()),
            "split": getattr(dataset, "split", split),  # None: the source has no splits
            "options": options,
        }
        write_array(dataset, out, source)
        click.echo(f"wrote {len(dataset)} images of {image_size}x{image_size} to {out}")

    command.help = f"Decode, crop and resize the `{name}` dataset once into a uint8 array in --out."
    return command


def main() -> None:
    """Console-script entry point: add plugin commands, then run the group."""
    try:
        add_commands(cli)
    except FmkitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="fmkit")
