"""The commands on a trained model: `fmkit sample`, `reflow`, `list-conditions`, `export` and
`demo`. Each parses its flags and calls library code; what the model samples with by default
is its own (fmkit.sampling)."""

from __future__ import annotations

from pathlib import Path

import click

from fmkit import checkpoint
from fmkit.conditions import condition_kind, parse_conditions, read_condition_file
from fmkit.device import resolve_device
from fmkit.errors import FmkitError
from fmkit.flags import (
    CHECKPOINT_HELP,
    accelerate,
    check_guidance,
    checkpoint_option,
    cond_option,
    device_option,
    ema_option,
    given,
    guidance_options,
    network_options,
    opt_flag,
    parse_interval,
    precision_option,
    seed_option,
    solver_flags,
)
from fmkit.generator import Generator, is_model_folder
from fmkit.options import parse_options
from fmkit.sample import sample_to_dir


@click.command("sample")
@checkpoint_option
@solver_flags
@click.option("--num-samples", default=64, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@seed_option()
@ema_option
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
@device_option
@cond_option
@click.option(
    "--cond-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="One image per line, each line's conditions as in --cond, comma-separated.",
)
@guidance_options
@network_options(many_batches=False)
@click.pass_context
def sample_command(
    ctx, ckpt, solver, steps, solver_opts, num_samples, batch_size, seed, ema, output,
    trajectory, device, conds, cond_file, guidance, guidance_interval, precision, compile_network,
) -> None:  # fmt: skip
    """Generate images from a checkpoint with any ODE solver (by default the model's own);
    prints the NFE of each batch.

    Example: fmkit sample --checkpoint results --cond Smiling=1 --cond Eyeglasses=1 --guidance 2
    """
    asked = given(ctx)
    if trajectory == 1:
        raise FmkitError("--trajectory K keeps K states from noise to image: K >= 2 (0: none)")
    options = parse_options(solver_opts, "--solver-opt")
    cond = parse_conditions(conds, "--cond") if conds else None
    if cond_file is not None:
        if conds or "num_samples" in asked:
            raise FmkitError("--cond-file gives one image per line; drop --cond and --num-samples")
        cond = read_condition_file(cond_file)
        num_samples = len(cond)
    interval = parse_interval(guidance_interval)
    generator = Generator.load(ckpt, ema=ema, device=resolve_device(device))
    accelerate(generator, precision, compile_network, many_batches=False)
    chosen = generator.defaults.solver_for(solver, steps, options)
    check_guidance(generator, asked)
    if chosen.solver.adaptive and "steps" in asked:
        click.echo(f"note: {chosen.name} is adaptive; --steps is ignored")
    report = sample_to_dir(
        generator, chosen.solver, output, num_samples, batch_size, seed, trajectory, click.echo,
        cond=generator.encode(cond, num_samples), guidance=guidance, interval=interval,
    )  # fmt: skip
    click.echo(
        f"{report.images} images in {output}/ ({chosen.spec}, mean NFE "
        f"{sum(report.nfe) / len(report.nfe):.1f}, {'bf16' if generator.bf16 else 'fp32'}); "
        f"{report.seconds:.2f} s, "
        f"{report.images / report.seconds:.1f} images/s"
    )


@click.command("reflow")
@click.option(
    "--teacher",
    required=True,
    type=click.Path(path_type=Path),
    help="The model whose ODE makes the pairs: " + CHECKPOINT_HELP,
)
@click.option("--num-pairs", required=True, type=click.IntRange(1), help="Noise-image pairs.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pair folder."
)
@solver_flags
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@seed_option("Seeds every pair's noise.")
@guidance_options
@device_option
@network_options(many_batches=True)
@click.pass_context
def reflow_command(
    ctx, teacher, num_pairs, out, solver, steps, solver_opts, batch_size, seed, guidance,
    guidance_interval, device, precision, compile_network,
) -> None:  # fmt: skip
    """Write a teacher's noise-image pairs for `fmkit train --objective reflow` (rectified flow,
    Liu et al. 2023); an interrupted run resumes when called again with the same settings.

    Example: fmkit reflow --teacher results --num-pairs 100000 --out pairs, then
    fmkit train --objective reflow --data-dir pairs --init-from results
    """
    from fmkit.reflow import write_pairs

    if not teacher.exists():
        raise FmkitError(f"--teacher {teacher} does not exist")
    options = parse_options(solver_opts, "--solver-opt")
    interval = parse_interval(guidance_interval)
    model = Generator.load(teacher, device=resolve_device(device))
    accelerate(model, precision, compile_network, many_batches=True)
    check_guidance(model, given(ctx))
    chosen = model.defaults.solver_for(solver, steps, options)
    # The checkpoint a run directory means now, recorded with the weights' digest.
    source = teacher if is_model_folder(teacher) else checkpoint.resolve(teacher)
    step = None if is_model_folder(teacher) else checkpoint.read_metadata(source).get("step")
    settings = {"teacher": str(source.resolve()), "teacher_step": step, "solver": chosen.spec}
    write_pairs(
        model, out, num_pairs, chosen.solver, settings, batch_size, seed, guidance, interval
    )
    click.echo(f"{num_pairs} pairs in {out}/ ({chosen.spec}); train on them with --objective "
               f"reflow --data-dir {out} --init-from {teacher}")  # fmt: skip


@click.command("list-conditions")
@checkpoint_option
def list_conditions_command(ckpt: Path) -> None:
    """Print what a model can be asked for: its classes, attributes or other conditions."""
    condition = Generator.load(ckpt).data.condition
    if condition.kind == "none":
        click.echo("unconditional: this model takes no conditions")
        return
    for line in condition_kind(condition.kind).describe(condition):
        click.echo(line)


@click.command("export")
@checkpoint_option
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder."
)
@click.option(
    "--format",
    "fmt",
    default="fmkit",
    show_default=True,
    help="A registered exporter (fmkit list exporters): fmkit (a weights-only folder), "
    "diffusers (UNet2DModel + flow-matching scheduler), onnx (the velocity network).",
)
@opt_flag("export", "Option of the exporter (repeatable; see `fmkit show exporters NAME`).")
@click.option("--fp16", is_flag=True, help="Exporters taking fp16 (fmkit): float16 weights.")
@ema_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Exporters taking batch_size (onnx): the graph's fixed batch size [default: 1].",
)
def export_command(ckpt, out, fmt, export_opts, fp16, ema, batch_size) -> None:
    """Export a trained model: a weights-only fmkit folder (config.json + model.safetensors,
    what `fmkit sample --checkpoint DIR` and `Generator.from_pretrained` read), a diffusers
    folder, an ONNX graph, or any installed exporter's format. Exports are loaded back with
    their own runtime and checked against fmkit's velocity where they can be (docs/export.md).
    """
    from fmkit.export import export
    from fmkit.plugins import registry

    options = parse_options(export_opts, "--export-opt")
    exporters = registry("exporters")
    exporters.get(fmt)  # an unknown format lists the installed ones
    for flag, key, value in (
        ("--fp16", "fp16", fp16 or None),
        ("--batch-size", "batch_size", batch_size),
    ):
        if value is not None:
            if not exporters.accepts(fmt, key):
                raise FmkitError(f"{flag} is not an option of exporter '{fmt}'")
            options.setdefault(key, value)
    generator = Generator.load(ckpt, ema=ema)
    click.echo(export(generator, out, fmt, options).summary)


@click.command("demo")
@checkpoint_option
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to serve on (loopback)."
)
@device_option
@precision_option
def demo_command(ckpt: Path, port: int, host: str, device: str, precision: str) -> None:
    """Serve a web page that generates images from a trained model on a click: seed, solver,
    steps, guidance and, for a conditional model, the controls of its condition kind; shows
    the images, the NFE, the time taken and the trajectory from noise to image
    (docs/export.md)."""
    from fmkit.demo import LOOPBACK, serve

    generator = Generator.load(ckpt, device=resolve_device(device)).accelerate(precision)
    server = serve(generator, host, port)
    if host.strip("[]") not in {name.strip("[]") for name in LOOPBACK}:
        click.echo(f"warning: not loopback: whoever reaches {host} can use this model", err=True)
    url_host, url_port = server.server_address[:2]
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    click.echo(f"fmkit demo: http://{url_host}:{url_port}/  (Ctrl+C stops it)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


COMMANDS = (sample_command, reflow_command, list_conditions_command, export_command, demo_command)
