"""The command line's shared flags, each declared once: plugin options, the solver, the device,
the seed, EMA weights, the checkpoint, conditions and guidance, and `fmkit train`'s flags made
from TrainConfig's fields (checked by the same validator as a TOML file's values)."""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from fmkit import config
from fmkit.config import SEED_MAX, TrainConfig
from fmkit.errors import FmkitError
from fmkit.generator import Generator
from fmkit.hub import is_repo_id, locate
from fmkit.sampling import GUIDANCE_MAX


def given(ctx: click.Context) -> set[str]:
    """The parameters set on the command line (not left at their defaults)."""
    return {n for n in ctx.params if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT}


def opt_flag(kind: str, help: str | None = None):
    """Repeatable `--KIND-opt KEY=VALUE` (parsed by fmkit.options.parse_options)."""
    return click.option(
        f"--{kind}-opt",
        f"{kind}_opts",
        multiple=True,
        metavar="KEY=VALUE",
        help=help or f"Option for the {kind} (repeatable; see `fmkit show {kind}s NAME`).",
    )


def solver_flags(func):
    """--solver, --steps and --solver-opt, the same on every command that samples; unset, the
    model's own (saved with it: fmkit.sampling.Sampling)."""
    func = opt_flag("solver")(func)
    func = click.option(
        "--steps",
        type=click.IntRange(1),
        help="Steps of a fixed-step solver [default: the model's].",
    )(func)
    return click.option(
        "--solver", help="Registered solver (fmkit list solvers) [default: the model's]."
    )(func)


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where to run (auto: cuda when torch sees a GPU).",
)

precision_option = click.option(
    "--precision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16"]),
    help="The network's precision while sampling (auto: bf16 on CUDA, fp32 on the CPU); the "
    "solver's state stays fp32. fp32 forces full precision.",
)


def network_options(many_batches: bool):
    """--precision and --compile/--no-compile for a command that samples: how its network runs
    (`Generator.accelerate`). Compiling is on by default on CUDA where many batches follow
    (`many_batches`: an evaluation, reflow pairs), whose warm-up it repays."""
    default = "on CUDA, off on the CPU" if many_batches else "off"

    def decorate(func):
        func = click.option(
            "--compile/--no-compile",
            "compile_network",
            default=None,
            help="torch.compile the network: a warm-up of tens of seconds, repaid over many "
            f"batches; a compiler failure falls back to eager [default: {default}].",
        )(func)
        return precision_option(func)

    return decorate


def accelerate(
    generator: Generator, precision: str, compile_network: bool | None, many_batches: bool
) -> Generator:
    """`generator` set up as `network_options` asked (None: the command's default)."""
    from fmkit.device import choose

    if compile_network is None:
        compile_network = None if many_batches else False  # None: on CUDA
    on = choose(generator.device, precision, False, False, compile_network).compile
    return generator.accelerate(precision, on)


ema_option = click.option(
    "--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights."
)


def seed_option(help: str = "Seeds the noise."):
    return click.option(
        "--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help=help
    )


CHECKPOINT_HELP = (
    "Checkpoint file, run directory (its newest checkpoint), exported folder, or a Hugging Face "
    "Hub repo id of one (org/name[@revision])."
)


class ModelSource(click.ParamType):
    """A local path that exists, or a Hub repo id, read into the local cache (fmkit.hub)."""

    name = "path"

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path) or not is_repo_id(value):
            if not Path(value).expanduser().exists():
                self.fail(f"Path {str(value)!r} does not exist.", param, ctx)
            return Path(value).expanduser()
        return locate(value)


# Every command that reads a trained model takes it the same way.
checkpoint_option = click.option(
    "--checkpoint", "ckpt", required=True, type=ModelSource(), help=CHECKPOINT_HELP
)

cond_option = click.option(
    "--cond",
    "conds",
    multiple=True,
    metavar="NAME=VALUE",
    help="Condition of every image, as the model's condition kind takes it (`fmkit "
    "list-conditions`; e.g. Smiling=1, those left out unspecified, or class=NAME, class=#INDEX "
    "for an index); repeatable.",
)


def guidance_options(func):
    """--guidance and --guidance-interval; unset, the model's own."""
    func = click.option(
        "--guidance-interval",
        metavar="LO,HI",
        help="Guide only at times LO <= t <= HI (t = 0 noise, 1 data; 0,1 guides throughout) "
        "[default: the model's].",
    )(func)
    return click.option(
        "--guidance",
        type=click.FloatRange(0, GUIDANCE_MAX),
        help="Classifier-free guidance weight w of a conditional model: v_u + w (v_c - v_u); 1 "
        "is none [default: the model's].",
    )(func)


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """`"0.2,0.8"` -> (0.2, 0.8); None stays None (the model's interval)."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise FmkitError(f"--guidance-interval expects LO,HI, got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise FmkitError(f"--guidance-interval needs 0 <= LO <= HI <= 1, got {text}")
    return lo, hi


def check_guidance(generator: Generator, asked: set[str]) -> None:
    """--guidance or --guidance-interval given for a model they cannot apply to."""
    flags = sorted({"guidance", "guidance_interval"} & asked)
    if flags and generator.data.condition.kind == "none":
        flag = "--" + flags[0].replace("_", "-")
        raise FmkitError(
            f"{flag}: this model is unconditional, so there is nothing to guide towards"
        )


# fmkit train's flags, one per TrainConfig field.


class ConfigValue(click.ParamType):
    """A train flag's value, checked by `config.check_value`: the same check a TOML file's
    value gets."""

    def __init__(self, field: str, base: type, choices: tuple[str, ...] | None) -> None:
        self.field, self.base, self.choices = field, base, choices
        self.name = {int: "integer", float: "float"}.get(base, "text")

    def get_metavar(self, param, ctx=None) -> str:  # (ctx from click 8.2 on)
        if self.choices:
            return "[" + "|".join(self.choices) + "]"
        return {int: "INTEGER", float: "FLOAT"}.get(self.base, "TEXT")

    def convert(self, value, param, ctx):
        if isinstance(value, str) and self.base in (int, float):
            try:
                value = self.base(value)
            except ValueError:
                what = "an integer" if self.base is int else "a number"
                self.fail(f"must be {what}, got {value!r}", param, ctx)
        try:
            return config.check_value(self.field, value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _config_flag(f) -> typing.Callable:
    """The click option of one TrainConfig field, from its type and metadata."""
    meta, name = f.metadata, f.name
    if name.endswith("_opts"):
        return opt_flag(name[: -len("_opts")], meta["help"] + " Repeatable.")
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    default = config.default_of(f)
    flag = "--" + name.replace("_", "-")
    if base is bool:
        return click.option(
            f"{flag}/--no-{flag[2:]}", name, default=default, show_default=not optional,
            help=meta["help"],
        )  # fmt: skip
    help = meta["help"]
    if base in (int, float) and (meta.get("min") is not None or meta.get("max") is not None):
        help += f" [{config.range_text(meta)}]"
    return click.option(
        flag, name, default=default, show_default=default is not None,
        type=ConfigValue(name, base, meta.get("choices")), help=help, metavar=meta.get("metavar"),
    )  # fmt: skip


def train_flags(func):
    """Every TrainConfig field as a flag."""
    for f in reversed(fields(TrainConfig)):
        func = _config_flag(f)(func)
    return func
