"""The `fmkit` command line: the command surface only. Train flags are generated from
TrainConfig's fields; every command parses its flags and calls library code."""

from __future__ import annotations

import json
import sys
import typing
from dataclasses import fields
from pathlib import Path

import click
from click.core import ParameterSource

from fmkit import checkpoint, config
from fmkit.conditions import condition_kind, parse_conditions, read_condition_file
from fmkit.config import SEED_MAX, TrainConfig
from fmkit.data import build_dataset, source_of
from fmkit.distributed import from_environment
from fmkit.errors import FmkitError
from fmkit.evaluate import (
    COND_SAMPLING,
    WEIGHTS_ENV,
    check_record_file,
    evaluate_solver,
    result_line,
    setup,
    training_data,
)
from fmkit.folders import claim, inside, size_of, write_json
from fmkit.generator import (
    GUIDANCE,
    GUIDANCE_INTERVAL,
    GUIDANCE_MAX,
    SAMPLE_SOLVER,
    SAMPLE_STEPS,
    Generator,
    is_model_folder,
)
from fmkit.options import check_options, describe_options, parse_options
from fmkit.plugins import KINDS, add_commands, list_plugins, registry
from fmkit.prepared import PREPARED, write_array
from fmkit.registry import unknown_name_message
from fmkit.report import SWEEP, bits_per_dim, write_sweep
from fmkit.sample import sample_to_dir
from fmkit.solver import build_solver, parse_solver_spec
from fmkit.train import resolve_device, train


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

    Backbones, datasets, probability paths, ODE solvers and training objectives are plugins,
    chosen by name; `fmkit list` shows what is installed.
    """


@cli.command("plugins")
def plugins_command() -> None:
    """Print the loaded plugins (name, version, hooks) as JSON."""
    click.echo(json.dumps(list_plugins(), indent=2))


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(list(KINDS)))
def list_command(kind: str | None) -> None:
    """List registered components with a one-line description.

    KIND is one of backbones, datasets, paths, solvers, objectives, conditions; all of them
    when omitted.
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


def _opt_flag(kind: str, help: str | None = None):
    return click.option(
        f"--{kind}-opt",
        f"{kind}_opts",
        multiple=True,
        metavar="KEY=VALUE",
        help=help or f"Option for the {kind} (repeatable; see `fmkit show {kind}s NAME`).",
    )


def _solver_flags(solver: str, steps: int):
    """--solver, --steps and --solver-opt, the same on every command that integrates."""

    def add(func):
        func = _opt_flag("solver")(func)
        func = click.option(
            "--steps", default=steps, show_default=True, type=click.IntRange(1),
            help="Steps of a fixed-step solver.",
        )(func)  # fmt: skip
        return click.option(
            "--solver", default=solver, show_default=True,
            help="Registered solver (fmkit list solvers).",
        )(func)  # fmt: skip

    return add


def _config_flag(f) -> typing.Callable:
    """The click option of one TrainConfig field, from its type and metadata."""
    meta, name = f.metadata, f.name
    if name.endswith("_opts"):
        return _opt_flag(name[: -len("_opts")], meta["help"] + " Repeatable.")
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


def _train_flags(func):
    for f in reversed(fields(TrainConfig)):
        func = _config_flag(f)(func)
    return func


@cli.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with the same keys as the flags; flags override it.",
)
@_train_flags
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --output.")
@click.pass_context
def train_command(ctx: click.Context, config_file: Path | None, resume: bool, **flags) -> None:
    """Train a flow-matching model; writes checkpoints, sample grids and metrics to --output.

    Example: fmkit train --backbone unet --dataset celeba
    """
    for name in [n for n in flags if n.endswith("_opts")]:
        flags[name] = parse_options(flags[name], f"--{name[: -len('_opts')]}-opt")
    given = {
        name for name in flags if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }
    final = train(config.resolve(flags, given, config_file), resume=resume, progress=True)
    if from_environment().is_main:
        click.echo(f"final checkpoint: {final}")


_device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where to run (auto: cuda when torch sees a GPU).",
)


def _seed_option(help: str = "Seeds the noise."):
    return click.option(
        "--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help=help
    )


_CHECKPOINT_HELP = "Checkpoint file, run directory (its newest checkpoint) or exported folder."
# Every command that reads a trained model takes it the same way.
_checkpoint_option = click.option(
    "--checkpoint",
    "ckpt",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help=_CHECKPOINT_HELP,
)


@cli.command("sample")
@_checkpoint_option
@_solver_flags(SAMPLE_SOLVER, SAMPLE_STEPS)
@click.option("--num-samples", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@_seed_option()
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
@_device_option
@click.option(
    "--cond",
    "conds",
    multiple=True,
    metavar="NAME=VALUE",
    help="Condition of every image: an attribute (Smiling=1, Eyeglasses=0; those left out are "
    "unspecified) or class=NAME (class=#INDEX for its index) (repeatable; `fmkit "
    "list-conditions`).",
)
@click.option(
    "--cond-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="One image per line, each line's conditions as in --cond, comma-separated.",
)
@click.option(
    "--guidance",
    default=GUIDANCE,
    show_default=True,
    type=click.FloatRange(0, GUIDANCE_MAX),
    help="Classifier-free guidance weight w of a conditional model: v_u + w (v_c - v_u); "
    "1 is none.",
)
@click.option(
    "--guidance-interval",
    default=",".join(f"{x:g}" for x in GUIDANCE_INTERVAL),
    show_default=True,
    metavar="LO,HI",
    help="Guide only at times LO <= t <= HI (t = 0 noise, 1 data); 0,1 guides throughout.",
)
@click.pass_context
def sample_command(
    ctx, ckpt, solver, steps, solver_opts, num_samples, batch_size, seed, ema, output,
    trajectory, device, conds, cond_file, guidance, guidance_interval,
) -> None:  # fmt: skip
    """Generate images from a checkpoint with any ODE solver; prints the NFE of each batch.

    Example: fmkit sample --checkpoint results --cond Smiling=1 --cond Eyeglasses=1 --guidance 2
    """
    given = {n for n in ctx.params if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT}
    if trajectory == 1:
        raise FmkitError("--trajectory K keeps K states from noise to image: K >= 2 (0: none)")
    built = build_solver(solver, steps=steps, options=parse_options(solver_opts, "--solver-opt"))
    cond = parse_conditions(conds, "--cond") if conds else None
    if cond_file is not None:
        if conds or "num_samples" in given:
            raise FmkitError("--cond-file gives one image per line; drop --cond and --num-samples")
        cond = read_condition_file(cond_file)
        num_samples = len(cond)
    interval = parse_interval(guidance_interval)
    generator = Generator.load(ckpt, ema=ema, device=resolve_device(device))
    check_guidance(generator, given)
    if built.adaptive and "steps" in given:
        click.echo(f"note: {solver} is adaptive; --steps is ignored")
    report = sample_to_dir(
        generator, built, output, num_samples, batch_size, seed, trajectory, click.echo,
        cond=generator.encode(cond, num_samples), guidance=guidance, interval=interval,
    )  # fmt: skip
    click.echo(
        f"{report.images} images in {output}/ ({solver}, mean NFE "
        f"{sum(report.nfe) / len(report.nfe):.1f}); {report.seconds:.2f} s, "
        f"{report.images / report.seconds:.1f} images/s"
    )


@cli.command("reflow")
@click.option(
    "--teacher",
    required=True,
    type=click.Path(path_type=Path),
    help="The model whose ODE makes the pairs: " + _CHECKPOINT_HELP,
)
@click.option("--num-pairs", required=True, type=click.IntRange(1), help="Noise-image pairs.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pair folder."
)
@_solver_flags("dopri5", 100)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@_seed_option("Seeds every pair's noise.")
@click.option(
    "--guidance",
    default=GUIDANCE,
    show_default=True,
    type=click.FloatRange(0, GUIDANCE_MAX),
    help="Classifier-free guidance weight of a class-conditional teacher (at "
    f"{GUIDANCE_INTERVAL[0]:g} <= t <= {GUIDANCE_INTERVAL[1]:g}).",
)
@_device_option
@click.pass_context
def reflow_command(
    ctx, teacher, num_pairs, out, solver, steps, solver_opts, batch_size, seed, guidance, device
) -> None:
    """Write a teacher's noise-image pairs for `fmkit train --objective reflow` (rectified flow,
    Liu et al. 2023); an interrupted run resumes when called again with the same settings.

    Example: fmkit reflow --teacher results --num-pairs 100000 --out pairs, then
    fmkit train --objective reflow --data-dir pairs --init-from results
    """
    from fmkit.reflow import write_pairs

    if not teacher.exists():
        raise FmkitError(f"--teacher {teacher} does not exist")
    options = parse_options(solver_opts, "--solver-opt")
    built = build_solver(solver, steps=steps, options=options)
    model = Generator.load(teacher, device=resolve_device(device))
    if ctx.get_parameter_source("guidance") is not ParameterSource.DEFAULT:
        check_guidance(model, {"guidance"})
    # The checkpoint a run directory means now, recorded with the weights' digest.
    source = teacher if is_model_folder(teacher) else checkpoint.resolve(teacher)
    spec = f"{solver}" if built.adaptive else f"{solver}:{steps}"
    spec += "".join(f":{k}={v}" for k, v in sorted(options.items()))
    step = None if is_model_folder(teacher) else checkpoint.read_metadata(source).get("step")
    settings = {"teacher": str(source.resolve()), "teacher_step": step, "solver": spec}
    write_pairs(model, out, num_pairs, built, settings, batch_size, seed, guidance)
    click.echo(f"{num_pairs} pairs in {out}/ ({spec}); train on them with --objective reflow "
               f"--data-dir {out} --init-from {teacher}")  # fmt: skip


def check_guidance(generator: Generator, given: set[str]) -> None:
    """--guidance and --guidance-interval given for a model they cannot apply to."""
    asked = sorted({"guidance", "guidance_interval"} & given)
    if asked and generator.data.condition.kind == "none":
        flag = "--" + asked[0].replace("_", "-")
        raise FmkitError(
            f"{flag}: this model is unconditional, so there is nothing to guide towards"
        )


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise FmkitError(f"--guidance-interval expects LO,HI, got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise FmkitError(f"--guidance-interval needs 0 <= LO <= HI <= 1, got {text}")
    return lo, hi


@cli.command("list-conditions")
@_checkpoint_option
def list_conditions_command(ckpt: Path) -> None:
    """Print what a model can be asked for: its classes, attributes or other conditions."""
    condition = Generator.load(ckpt).data.condition
    if condition.kind == "none":
        click.echo("unconditional: this model takes no conditions")
        return
    for line in condition_kind(condition.kind).describe(condition):
        click.echo(line)


@cli.command("export")
@_checkpoint_option
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["fmkit", "diffusers", "onnx"]),
    default="fmkit",
    show_default=True,
    help="fmkit: weights-only folder; diffusers: UNet2DModel + flow-matching scheduler; "
    "onnx: the velocity network for onnxruntime.",
)
@click.option("--fp16", is_flag=True, help="fmkit format: store the weights in float16.")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Export the EMA weights.")
@click.option(
    "--batch-size",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="onnx format: the graph's fixed batch size.",
)
def export_command(ckpt: Path, out: Path, fmt: str, fp16: bool, ema: bool, batch_size: int) -> None:
    """Export a trained model: a weights-only fmkit folder (config.json + model.safetensors,
    what `fmkit sample --checkpoint DIR` and `Generator.from_pretrained` read), a diffusers
    folder, or an ONNX graph. The diffusers and ONNX exports are loaded back with their own
    runtime and checked against fmkit's velocity (docs/export.md).
    """
    from fmkit.export import export_diffusers, export_onnx

    if fp16 and fmt != "fmkit":
        raise FmkitError("--fp16 applies to --format fmkit only")
    generator = Generator.load(ckpt, ema=ema)
    try:
        if fmt == "fmkit":
            generator.save_pretrained(out, fp16=fp16)
            files = [out / "config.json", out / "model.safetensors"]
        elif fmt == "diffusers":
            report = export_diffusers(generator, out)
        else:
            report = export_onnx(generator, out, batch_size)
    except OSError as exc:  # an unwritable or full output folder
        raise FmkitError(f"cannot write the export to {out}: {exc.strerror or exc}") from None
    if fmt == "fmkit":
        count = sum(p.numel() for p in generator.module.parameters())
        click.echo(
            f"wrote {out}/config.json and model.safetensors ({count:,} parameters, "
            f"{'float16' if fp16 else 'float32'}, {size_of(files) / 2**20:.1f} MiB)"
        )
        return
    click.echo(
        f"wrote {len(report.files)} files ({size_of(report.files) / 2**20:.1f} MiB) to {out} "
        f"(see {out / 'README.md'})"
    )
    click.echo(
        f"checked: the exported model's velocity matches fmkit's to {report.relative_error:.1e} "
        f"(relative)"
    )


@cli.command("demo")
@_checkpoint_option
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to serve on (loopback)."
)
@_device_option
def demo_command(ckpt: Path, port: int, host: str, device: str) -> None:
    """Serve a web page that generates images from a trained model on a click: seed, solver,
    steps, guidance and, for a conditional model, each attribute or the class; shows the
    images, the NFE, the time taken and the trajectory from noise to image (docs/export.md)."""
    from fmkit.demo import serve

    generator = Generator.load(ckpt, device=resolve_device(device))
    server = serve(generator, host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: not loopback: whoever reaches {host} can use this model", err=True)
    url_host, url_port = server.server_address[:2]
    click.echo(f"fmkit demo: http://{url_host}:{url_port}/  (Ctrl+C stops it)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cli.group("eval")
def eval_group() -> None:
    """Measure a checkpoint: FID/KID/precision-recall, a solver sweep, or bits/dim."""


def _eval_options(func):
    options = [
        _checkpoint_option,
        click.option("--dataset", help="Reference dataset [default: the checkpoint's]."),
        click.option("--data-dir", help="Reference dataset root [default: the checkpoint's]."),
        click.option("--split", default="train", show_default=True, help="Reference split."),
        _opt_flag(
            "dataset", "Reference dataset option [default: the checkpoint's, e.g. its crop]."
        ),
        click.option("--num-samples", default=50000, show_default=True, type=click.IntRange(2)),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1)),
        _seed_option(),
        click.option("--ema/--no-ema", default=True, show_default=True),
        click.option(
            "--metrics", default="fid", show_default=True, help="Comma-separated: fid, kid, prc."
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
        _device_option,
        click.option(
            "--cond",
            "conds",
            multiple=True,
            metavar="NAME=VALUE",
            help="A conditional model: every sample's condition, as on `fmkit sample` "
            "[default: drawn as --cond-sampling says].",
        ),
        click.option(
            "--cond-sampling",
            type=click.Choice(COND_SAMPLING),
            help="A conditional model: conditions drawn from the reference data's labels (its "
            "class frequencies, its attributes' joint distribution) or classes uniformly "
            "[default: data].",
        ),
        click.option(
            "--guidance",
            type=click.FloatRange(0, GUIDANCE_MAX),
            help=f"A conditional model's guidance weight [default: the model's, {GUIDANCE:g}].",
        ),
        click.option(
            "--guidance-interval",
            metavar="LO,HI",
            help="Guide only at times LO <= t <= HI [default: the model's, "
            f"{GUIDANCE_INTERVAL[0]:g},{GUIDANCE_INTERVAL[1]:g}].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _setup(common: dict):
    return setup(
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
        interval=parse_interval(common["guidance_interval"])
        if common["guidance_interval"]
        else None,
    )


@eval_group.command("fid")
@_eval_options
@_solver_flags("dopri5", 100)
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
    if json_out is not None:
        check_record_file(json_out)  # refused before the evaluation, not after
    ev = _setup(common)
    options = parse_options(solver_opts, "--solver-opt")
    built = build_solver(solver, steps=steps, options=options)
    record = evaluate_solver(
        ev, solver, built, options, common["num_samples"], common["batch_size"], common["seed"]
    )
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


@eval_group.command("nll")
@_checkpoint_option
@click.option("--dataset", help="[default: the checkpoint's]")
@click.option("--data-dir", help="[default: the checkpoint's]")
@click.option("--split", default="test", show_default=True)
@_opt_flag("dataset")
@click.option("--num-images", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--solver", default="dopri5", show_default=True)
@_opt_flag("solver")
@_seed_option("Seeds the dequantisation and the trace estimator.")
@click.option("--ema/--no-ema", default=True, show_default=True)
@_device_option
def eval_nll(
    ckpt, dataset, data_dir, split, dataset_opts, num_images, batch_size, solver, solver_opts,
    seed, ema, device,
):  # fmt: skip
    """Negative log-likelihood in bits/dim (uniform dequantisation; dopri5 + Hutchinson trace)."""
    built = build_solver(solver, options=parse_options(solver_opts, "--solver-opt"))
    generator = Generator.load(ckpt, ema=ema, device=resolve_device(device))
    trained_on = training_data(ckpt)
    if dataset is None and not trained_on:
        raise FmkitError(f"{ckpt} records no training data: pass --dataset and --data-dir")
    options = dict(trained_on.get("dataset_opts", {})) if dataset is None else {}
    options.update(config.dataset_options(parse_options(dataset_opts, "--dataset-opt")))
    name = dataset or trained_on["dataset"]
    data = build_dataset(
        name, data_dir or trained_on["data_dir"], generator.data.image_size, split, options
    )
    served = getattr(data, "split", split)
    if served is None:
        click.echo(
            f"note: dataset '{name}' has no splits; --split {split} is ignored "
            "and its images are scored as they are"
        )
    report = {**bits_per_dim(generator, data, built, num_images, batch_size, seed), "split": served}
    click.echo(
        f"{report['bits_per_dim']:.4f} bits/dim ± {report['stderr']:.4f} over {report['images']} "
        f"images ({solver}, mean NFE {report['mean_nfe']:.1f})"
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
    @_opt_flag("dataset", "Dataset option (repeatable).")
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


def main() -> None:
    """Console-script entry point: add plugin commands, then run the group."""
    try:
        add_commands(cli)
    except FmkitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    cli(prog_name="fmkit")
