"""The `fmkit` command line: the command surface only. The group (every mistake one line),
the commands about plugins, `fmkit train` (its flags are TrainConfig's fields) and `fmkit
prepare`; the commands on a trained model are in fmkit.cli_model, `fmkit eval` in
fmkit.cli_eval, the shared flags in fmkit.flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fmkit import cli_ema, cli_eval, cli_model, config
from fmkit.data import build_dataset, source_of
from fmkit.distributed import from_environment
from fmkit.errors import FmkitError
from fmkit.flags import given, opt_flag, train_flags
from fmkit.folders import claim, inside
from fmkit.interrupt import Interrupted
from fmkit.options import check_options, describe_options, parse_options
from fmkit.plugins import KINDS, add_commands, list_plugins, registry
from fmkit.prepared import PREPARED, write_array
from fmkit.registry import unknown_name_message
from fmkit.run_folder import resumed_config
from fmkit.train import train


class _UsageLine(click.ClickException):
    exit_code = 2  # click's status for a bad command line


# click 8.2's "a group run alone prints its help", a UsageError that is not a mistake
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class FmkitGroup(click.Group):
    """A click group under which every mistake a user can make ends in one line on stderr
    and a non-zero exit: FmkitError (status 1), a bad flag or value (2, click's usage errors
    without the usage block), and an operating-system error such as a full disk or a
    read-only folder that no writer caught (1), named by its path and cause."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Interrupted as exc:  # saved: say how to go on, exit 128 + the signal
            click.echo(str(exc), err=True)
            ctx.exit(exc.exit_code)
        except FmkitError as exc:
            raise click.ClickException(str(exc)) from None
        except _NO_ARGS_HELP:
            raise  # `fmkit eval` alone: click shows the group's help
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "fmkit"
            raise _UsageLine(f"{exc.format_message()} (see `{where} --help`)") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None


@click.group(cls=FmkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmkit")
def cli() -> None:
    """fmkit: train flow-matching image generators and sample from them.

    Backbones, datasets, probability paths, ODE solvers, training objectives, conditions,
    exporters, metrics and spaces are plugins, chosen by name; `fmkit list` shows what is
    installed.
    """


@cli.command("plugins")
def plugins_command() -> None:
    """Print the loaded plugins (name, version, hooks) as JSON."""
    click.echo(json.dumps(list_plugins(), indent=2))


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(list(KINDS)))
def list_command(kind: str | None) -> None:
    """List registered components with a one-line description.

    KIND is one of backbones, datasets, paths, solvers, objectives, conditions, exporters,
    metrics, spaces; all of them when omitted.
    """
    for name in [kind] if kind else list(KINDS):
        reg = registry(name)
        if not kind:
            click.echo(f"{name}:")
        width = max((len(n) for n in reg.names()), default=0)
        for entry in reg:
            indent = "" if kind else "  "
            click.echo(f"{indent}{entry.name:<{width}}  {entry.description}".rstrip())


@cli.command("show")
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.argument("name")
@click.option(
    "--opt",
    "-o",
    "opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option to check and build with.",
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
    supplied = (*KINDS[kind].fixed, *KINDS[kind].optional)  # fmkit's arguments, not options
    built = None
    if kind in ("backbones", "paths", "solvers"):  # cheap to build: every value gets checked
        fixed = {"image_size": image_size, "channels": channels} if kind == "backbones" else {}
        built = reg.build(name, options, **fixed)
    else:  # datasets read files and objectives need a path: check the options only
        check_options(entry.factory, options, f"{reg.kind} '{name}'", dict.fromkeys(supplied))
    click.echo(f"{entry.name} ({reg.kind} from plugin {entry.plugin})")
    if entry.description:
        click.echo(f"  {entry.description}")
    click.echo("options:")
    for line in describe_options(entry.factory, skip=supplied):
        click.echo(f"  {line}")
    if kind == "backbones":
        count = sum(p.numel() for p in built.parameters())
        click.echo(f"parameters: {count:,} ({count / 1e6:.1f}M) at {image_size}x{image_size}")


@cli.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with the same keys as the flags; flags override it.",
)
@train_flags
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --output from its newest checkpoint, with the run's own "
    "settings; flags may change only limits, intervals, logging, workers and paths.",
)
@click.pass_context
def train_command(ctx: click.Context, config_file: Path | None, resume: bool, **flags) -> None:
    """Train a flow-matching model; writes checkpoints, sample grids and metrics to --output.

    Example: fmkit train --backbone unet --dataset celeba
    """
    for name in [n for n in flags if n.endswith("_opts")]:
        flags[name] = parse_options(flags[name], f"--{name[: -len('_opts')]}-opt")
    settle = resumed_config if resume else config.resolve  # a resumed run keeps its settings
    final = train(settle(flags, given(ctx), config_file), resume=resume, progress=True)
    if from_environment().is_main:
        click.echo(f"final checkpoint: {final}")


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
        "--condition",
        default="none",
        show_default=True,
        help="Keep the labels of this condition kind (fmkit list conditions), so "
        "`--dataset prepared --condition ...` can train on them.",
    )
    @click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory to write.",
    )
    @opt_flag("dataset", "Dataset option (repeatable).")
    def command(
        data_dir: str, image_size: int, split: str, condition: str, out: Path, dataset_opts
    ):
        options = config.dataset_options(parse_options(dataset_opts, "--dataset-opt"))
        if inside(out, data_dir) or inside(data_dir, out):
            raise FmkitError(
                f"--out {out} and --data-dir {data_dir} overlap; fmkit prepare never writes "
                "into or over its input: choose an --out outside --data-dir"
            )
        claim(out, PREPARED)  # refused before any download or decoding
        dataset = build_dataset(name, data_dir, image_size, split, options, condition)
        source = source_of(name, data_dir, getattr(dataset, "split", split), options)
        write_array(dataset, out, source)
        click.echo(f"wrote {len(dataset)} images of {image_size}x{image_size} to {out}")

    command.help = f"Decode, crop and resize the `{name}` dataset once into a uint8 array in --out."
    return command


for _command in (*cli_model.COMMANDS, cli_ema.ema_command, cli_eval.eval_group):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point: add plugin commands, then run the group."""
    try:
        add_commands(cli)
    except FmkitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="fmkit")
