"""Evaluation reports: solver sweeps (Markdown, JSON, plot) and bits/dim over a dataset."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fmkit.collate import collate
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim, write_json
from fmkit.generator import Generator
from fmkit.likelihood import dequantized_bits_per_dim
from fmkit.sampling import ChosenSolver
from fmkit.solver import Solver

# A sweep's folder (one from before folders were marked is a user's: sweeps are rerun).
SWEEP = FolderKind("sweep", "a solver sweep", "fmkit eval sweep")


def write_sweep(records: list[dict], metrics: tuple[str, ...], out: Path) -> None:
    """sweep.json (every record), sweep.md (a table) and sweep.png (each metric vs NFE) in
    `out`, a new folder or an earlier sweep's (claim it with SWEEP before evaluating)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FmkitError("the sweep plot needs matplotlib: pip install 'fmkit[eval]'") from None
    from fmkit.evaluate import metric, reference_text

    folder = claim(out, SWEEP)
    folder.add("sweep.json", "sweep.md", "sweep.png")
    write_json(out / "sweep.json", records)
    keys = [key for name in metrics for key in metric(name).columns]  # each metric's columns
    lines = [
        "| solver | mean NFE | " + " | ".join(keys) + " | images/s |",
        "|" + " --- |" * (len(keys) + 3),
    ]
    for r in records:
        lines.append(
            f"| {r['solver']} | {r['mean_nfe']:.1f} | "
            + " | ".join(f"{r[k]:.4g}" for k in keys)
            + f" | {r['images_per_s']:.1f} |"
        )
    ref = records[0]["reference"]
    lines.append("")
    lines.append(
        f"{records[0]['num_samples']} samples each; reference {reference_text(ref)}; "
        f"{records[0]['backend']}, {records[0]['mode']}."
    )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for r in records:
            ax.scatter(r["mean_nfe"], r[key])
            ax.annotate(r["solver"], (r["mean_nfe"], r[key]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(key.upper())
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)


@torch.no_grad()
def bits_per_dim(
    generator: Generator, data, solver: Solver, num_images: int, batch_size: int, seed: int
) -> dict:
    """Mean bits/dim of the first `num_images` items of a map-style dataset."""
    if not hasattr(data, "__len__"):
        raise FmkitError("bits/dim needs a map-style dataset (not WebDataset shards)")
    if not generator.space.lossless:
        raise FmkitError(
            f"bits/dim needs a model in a lossless space; this one generates in the space "
            f"{generator.spec.space!r}, whose likelihood is not the images'"
        )
    count = min(num_images, len(data))
    rng = torch.Generator().manual_seed(seed)
    velocity = generator.velocity()
    values, nfes = [], []
    # By batch, with the adaptive solver's NFE, so a long evaluation is never silent.
    bar = tqdm(total=count, unit="img", desc="bits/dim", disable=None)
    for start in range(0, count, batch_size):
        batch = collate([data[i] for i in range(start, min(count, start + batch_size))])
        images = batch.images.to(generator.device)
        bpd, nfe = dequantized_bits_per_dim(velocity, images, solver, rng, generator.space.encode)
        values.append(bpd.cpu())
        nfes.append(nfe)
        bar.update(len(images))
        bar.set_postfix(nfe=nfe)
    bar.close()
    all_values = torch.cat(values).double()
    stderr = (
        all_values.std().item() / math.sqrt(len(all_values))
        if len(all_values) > 1
        else float("nan")
    )
    return {
        "bits_per_dim": all_values.mean().item(),
        "stderr": stderr,
        "images": count,
        "mean_nfe": sum(nfes) / len(nfes),
    }


def nll_report(
    generator: Generator,
    source: Path,
    solver: ChosenSolver,
    *,
    dataset: str | None,
    data_dir: str | None,
    split: str,
    options: dict,
    num_images: int,
    batch_size: int,
    seed: int,
    note=print,
) -> dict:
    """`fmkit eval nll`: bits/dim of `generator` over the images of a dataset (default: the
    one `source` was trained on, with its options under `options`); `note` hears that a
    dataset without splits is scored as it is. Returns the report, its split included."""
    from fmkit.data import build_dataset
    from fmkit.evaluate import training_data

    trained_on = training_data(source)
    if dataset is None and not trained_on:
        raise FmkitError(f"{source} records no training data: pass --dataset and --data-dir")
    merged = dict(trained_on.get("dataset_opts", {})) if dataset is None else {}
    merged.update(options)
    name = dataset or trained_on["dataset"]
    data = build_dataset(
        name, data_dir or trained_on["data_dir"], generator.data.image_size, split, merged
    )
    served = getattr(data, "split", split)
    if served is None:
        note(
            f"note: dataset '{name}' has no splits; --split {split} is ignored and its images "
            "are scored as they are"
        )
    report = bits_per_dim(generator, data, solver.solver, num_images, batch_size, seed)
    return {**report, "solver": solver.spec, "split": served}
