"""Exports of a Generator for other runtimes, as a plugin kind (`register_exporters`): fmkit's
own weights-only folder, a diffusers folder and an ONNX velocity network are the built-in
exporters (fmkit_plugins.exporters, fmkit_plugins.export_diffusers).

Every export is written aside and moved into place whole, into a folder it owns (see
fmkit.folders), and is checked where it can be: the exported model is loaded back with its own
runtime and its velocity compared with fmkit's on the same inputs (`check_inputs`, covering
every condition state); above the exporter's tolerance the export fails and leaves nothing.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fmkit.batch import Cond
from fmkit.conditions import condition_kind
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim
from fmkit.generator import Generator


class Exporter(ABC):
    """An export format. Its factory takes the format's options (`--export-opt KEY=VALUE`;
    `fmkit export --fp16` and `--batch-size` reach the exporters whose factory takes `fp16` or
    `batch_size`).

    Attributes:
        folder: the kind of folder it writes (its mark; see fmkit.folders).
    """

    folder: FolderKind

    @abstractmethod
    def write(self, generator: Generator, staging: Path) -> float | None:
        """Write the export of `generator` into `staging`, an empty folder that is moved into
        place once this returns, and check it: the relative error of the exported velocity
        against fmkit's (`check_inputs`, `relative`), or None when there is nothing to check.
        Raise FmkitError for a model the format cannot express (nothing is left behind)."""

    def summary(
        self, generator: Generator, out: Path, files: list[Path], error: float | None
    ) -> str:
        """What `fmkit export` prints once the export is in place: by default how many
        files, their size and the check's result."""
        size = sum(p.stat().st_size for p in files) / 2**20
        text = f"wrote {len(files)} files ({size:.1f} MiB) to {out}"
        if error is not None:
            text += f"; checked: the exported model's velocity matches fmkit's to {error:.1e} (relative)"
        return text


@dataclass
class ExportReport:
    """What an export wrote and how closely the exported model matched fmkit's.

    Attributes:
        files: every file written (in folders too).
        relative_error: of the exported velocity against fmkit's (None: not checked).
        summary: the line `fmkit export` prints.
    """

    files: list[Path]
    relative_error: float | None
    summary: str


def export(generator: Generator, out: Path, name: str, options: dict | None = None) -> ExportReport:
    """Export `generator` into `out` with the registered exporter `name` and its `options`:
    the folder is claimed (refused if another command's, before anything is written), the
    export written aside and checked, then moved into place."""
    from fmkit.plugins import registry

    exporter = registry("exporters").build(name, options or {})
    folder = claim(out, exporter.folder)
    errors: list[float | None] = []
    try:
        installed = folder.write_staged(
            lambda staging: errors.append(exporter.write(generator, staging))
        )
    except OSError as exc:  # an unwritable or full output folder
        raise FmkitError(f"cannot write the export to {out}: {exc.strerror or exc}") from None
    files = sorted(
        f for p in installed for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()
    )
    return ExportReport(files, errors[0], exporter.summary(generator, Path(out), files, errors[0]))


# Helpers for exporters.


def pixels_only(generator: Generator, format: str) -> None:
    """Formats whose readers expect images straight from the network (the velocity of an
    image, a diffusers pipeline) take models that generate in pixels only."""
    if not generator.space.images:
        raise FmkitError(
            f"export: --format {format} takes models that generate in pixels; this one "
            f"generates in the space {generator.spec.space!r} (--format fmkit keeps it)"
        )


def check_inputs(generator: Generator, batch: int) -> list[tuple[Tensor, Tensor, Cond | None]]:
    """Batches of `batch` checking inputs: (batch, C, H, W) random states, (batch,) times over
    [0, 1] and conditions in which every state of the model's condition kind occurs (its
    `examples`: each class and "unspecified", say) — at least 4 samples in all."""
    g = torch.Generator().manual_seed(0)
    data = generator.data
    condition = data.condition
    if condition.kind == "none":
        labels = torch.zeros(4)
    else:
        labels = condition_kind(condition.kind).examples(condition, g)
    total = -(-len(labels) // batch) * batch  # whole batches
    labels = labels[torch.arange(total) % len(labels)]
    channels, size = generator.spec.model_shape()  # the velocity network's own inputs
    x = torch.randn(total, channels, size, size, generator=g)
    t = torch.linspace(0, 1, total)
    batches = []
    for start in range(0, total, batch):
        rows = slice(start, start + batch)
        cond = None if condition.kind == "none" else {condition.kind: labels[rows]}
        batches.append((x[rows], t[rows], cond))
    return batches


def velocity(generator: Generator, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
    """fmkit's velocity at (x, t) given `cond`, what an export is compared with."""
    with torch.no_grad():
        return Velocity(generator.module, list(cond or {}))(x, t, *(cond or {}).values())


class Velocity(nn.Module):
    """The backbone with its conditions as positional tensors (what an ONNX graph takes)."""

    def __init__(self, module: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.module, self.keys = module, keys

    def forward(self, x: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        cond = dict(zip(self.keys, labels, strict=True)) if self.keys else None
        return self.module(x, t, cond) if cond is not None else self.module(x, t)


def relative(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def require(package: str):
    """Import an optional package of the export extra, or one line saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise FmkitError(
            f"export: this format needs {package}: pip install 'fmkit[export]'"
        ) from None


def cause(exc: Exception) -> str:
    """The line of a library's exception worth showing: the operating system's cause when it
    carries one (a full disk inside a safetensors or ONNX error), else its first line."""
    text = str(exc).strip()
    for cause in ("No space left on device", "Read-only file system", "Permission denied"):
        if cause in text:
            return cause
    return text.splitlines()[0] if text else type(exc).__name__


def conditions_text(generator: Generator, diffusers: bool) -> str:
    condition = generator.data.condition
    if condition.kind == "none":
        return "Unconditional."
    return condition_kind(condition.kind).export_text(condition)[
        "diffusers" if diffusers else "onnx"
    ]


def labels_line(generator: Generator, onnx: bool, batch: int) -> str:
    """The sampling loop's line choosing the conditions (all unspecified), '' if there are none."""
    condition = generator.data.condition
    if condition.kind == "none":
        return ""
    text = condition_kind(condition.kind).export_text(condition)
    value = text["unspecified_onnx" if onnx else "unspecified_diffusers"].format(batch=batch)
    return f"{'cond' if onnx else 'labels'} = {value}  # unspecified; see above\n"


def readme_starts(text: str):
    def recognise(root: Path) -> bool:
        try:
            return (root / "README.md").read_text().startswith(text)
        except OSError:
            return False

    return recognise
