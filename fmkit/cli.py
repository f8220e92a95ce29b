"""The `fmkit` command line. Commands parse flags and call library code; logic lives elsewhere."""

from __future__ import annotations

import json
import sys

import click

from fmkit.errors import FmkitError
from fmkit.options import check_options, describe_options, parse_options
from fmkit.plugins import KINDS, add_commands, list_plugins, registry


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


def main() -> None:
    """Console-script entry point: add plugin commands, then run the group."""
    try:
        add_commands(cli)
    except FmkitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="fmkit")
