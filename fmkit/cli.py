"""The `fmkit` command line. Commands parse flags and call library code; logic lives elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fmkit.data import build_dataset
from fmkit.errors import FmkitError
from fmkit.options import check_options, describe_options, parse_options
from fmkit.plugins import KINDS, add_commands, list_plugins, registry
from fmkit.prepared import write_array
from fmkit.registry import unknown_name_message


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


# What fmkit itself passes to each kind of factory (never a user option); see docs/plugins.md.
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
            "split": split,
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
