"""Conditions: what a model can be asked for, as a plugin kind (`register_conditions`).

A condition kind — one of K classes, K binary attributes, a continuous value, a caption —
owns everything fmkit does with conditions of that kind, so the core never branches on one:
how a dataset's labels become a batch, the embedding a backbone adds, the "unspecified" state
that condition dropout and guidance use, which samples may share noise under OT coupling, how
a user asks for one (CLI, `--cond-file`, the demo, the Python API), the captions of training
grids, and how exports describe it. `class` and `attributes` are built-in plugins of this kind
(fmkit_plugins.conditions).

A model's conditions are described by `fmkit.Condition(kind, names)` (in its DataSpec); in a
batch they are `cond[kind] = values`, a tensor whose first dimension is the batch (see
fmkit.batch). The registry gives the kind's object by name: `condition_kind("class")`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fmkit.batch import Cond, Condition
from fmkit.errors import FmkitError


class ConditionKind(ABC):
    """One kind of condition. Methods that need the model's condition take its description,
    `condition` (`condition.names`: the K names); methods on values take tensors only.

    Values are what a batch carries: (B, ...) tensors, e.g. (B,) class indices or (B, K)
    attribute states; `unspecified_like` says what "nothing asked for" is.
    """

    # Data.

    @abstractmethod
    def collate(self, labels: Sequence[Any]) -> Tensor:
        """(B, ...) values from B dataset labels (what a dataset item carries after its image)."""

    @abstractmethod
    def unspecified_like(self, values: Tensor) -> Tensor:
        """Values shaped like `values` in which nothing is asked for: guidance's unconditional
        half, condition dropout, a sample whose condition was left out."""

    def drop(self, values: Tensor, whole: Tensor, draws, part_rate: float) -> Tensor:
        """Values with the rows where `whole` (B,) is true left unspecified (condition
        dropout); a kind with parts (attributes) may also leave each part out at `part_rate`,
        drawing from `draws` (the step's seeded fmkit.Draws)."""
        mask = whole.view(-1, *(1,) * (values.dim() - 1))
        return torch.where(mask, self.unspecified_like(values), values)

    def group_key(self, values: Tensor) -> Tensor:
        """(B, M) rows that are equal exactly for samples allowed to share noise under OT
        coupling (pairs never cross conditions); a continuous kind may bin its values."""
        return values.reshape(len(values), -1)

    # Model.

    @abstractmethod
    def embedding(self, condition: Condition, dim: int) -> nn.Module:
        """A module called as `module(cond, batch, device) -> (batch, dim)` with `cond` a
        batch's condition dict (or None: everything unspecified), which a backbone adds to its
        time embedding. An exporter may ask it for `class_table()` (diffusers)."""

    # Users.

    @abstractmethod
    def encode(self, condition: Condition, wanted: Mapping[str, Any]) -> Tensor:
        """One sample's values (the values of a batch of one, without the batch dimension)
        from what a user asks: keys and values as text (`--cond`, `--cond-file`) or JSON (the
        demo, the Python API). What is left out is unspecified; a bad key or value is an
        FmkitError saying what can be asked for."""

    @abstractmethod
    def describe(self, condition: Condition) -> list[str]:
        """Lines for `fmkit list-conditions`: what can be asked for and how."""

    @abstractmethod
    def grid_rows(self, condition: Condition, rows: int) -> list[tuple[str, dict]]:
        """(caption, what to ask for) of each of `rows` rows of a training grid, chosen so
        that control can be watched as it emerges."""

    @abstractmethod
    def controls(self, condition: Condition) -> list[dict]:
        """The demo page's controls: {"key", "label", "choices": [[value, text], ...]} (the
        first choice, value "", is unspecified; "style": "radio" or "select"), or
        {"key", "label", "number": {"min", "max", "step"}} (empty is unspecified)."""

    def states(self, condition: Condition) -> Tensor | None:
        """(N, ...) every specified state, when there are few (a class: its K indices), else
        None. Reflow makes pairs balanced over them, and evaluation can draw them uniformly."""
        return None

    # Export.

    @abstractmethod
    def examples(self, condition: Condition, generator: torch.Generator) -> Tensor:
        """(N, ...) values in which every state occurs (unspecified included): what an export
        is checked on."""

    @abstractmethod
    def export_text(self, condition: Condition) -> dict[str, str]:
        """How exports describe the input: {"onnx": what the ONNX input takes, "onnx_dtype":
        its NumPy dtype, "unspecified_onnx": a NumPy expression of B unspecified rows, with
        {batch} for B}, plus {"diffusers", "unspecified_diffusers"} when `class_labels` maps it."""

    def class_labels(self, condition: Condition, values: Tensor) -> Tensor:
        """(B,) int64 rows of the diffusers class-embedding table (`embedding(...).class_table`)
        for `values`; a kind that cannot be a lookup table raises FmkitError."""
        raise FmkitError(
            f"export: {condition.kind} conditions do not map to diffusers' class labels"
        )


def condition_kind(name: str) -> ConditionKind:
    """The registered condition kind `name` (an unknown one is an error listing the others)."""
    from fmkit.plugins import registry

    kind = registry("conditions").build(name)
    if not isinstance(kind, ConditionKind):
        raise FmkitError(f"condition kind '{name}' is not a fmkit.ConditionKind")
    return kind


def condition_keys(cond: Mapping[str, Tensor] | None) -> list[str]:
    """The keys of a batch's condition dict that are conditions (not, say, a second time "r"
    that a few-step objective adds)."""
    from fmkit.plugins import registry

    names = set(registry("conditions").names())
    return [key for key in (cond or {}) if key in names]


def unconditional(cond: Cond) -> Cond:
    """`cond` with every condition unspecified (guidance's second half); other keys kept."""
    keys = condition_keys(cond)
    return {k: condition_kind(k).unspecified_like(v) if k in keys else v for k, v in cond.items()}


def encode_conditions(condition: Condition, wanted: Any, n: int) -> Cond | None:
    """Conditions as a user gives them -> the tensors a model takes, one row per sample.

    `wanted` is None; a mapping of names to values applied to every sample (what the kind's
    `encode` takes: {"Smiling": 1, "Eyeglasses": 0}, {"class": "cat"}); a list of n such
    mappings, one per sample; or tensors already in fmkit.batch's form ({"class": (n,)}).
    """
    if wanted is None or (isinstance(wanted, Mapping) and not wanted):
        return None
    if isinstance(wanted, Mapping) and all(isinstance(v, Tensor) for v in wanted.values()):
        return dict(wanted)
    if condition.kind == "none":
        raise FmkitError("this model was trained without conditions; sample it without any")
    rows = list(wanted) if isinstance(wanted, (list, tuple)) else [wanted] * n
    if len(rows) != n:
        raise FmkitError(f"{len(rows)} conditions given for {n} samples")
    kind = condition_kind(condition.kind)
    for row in rows:
        if not isinstance(row, Mapping):
            raise FmkitError(f"a condition is NAME: VALUE pairs, got {row!r}")
    return {condition.kind: torch.stack([kind.encode(condition, row) for row in rows])}


# What users type: `--cond NAME=VALUE` (repeatable) and `--cond-file FILE`.


def parse_conditions(pairs, flag: str) -> dict:
    """`("Smiling=1", "class=cat")` -> {"Smiling": "1", "class": "cat"}: values stay text,
    so a class named "2" is that class (its index is spelled class=#2)."""
    wanted = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise FmkitError(f"{flag} expects NAME=VALUE, got {pair!r}")
        wanted[name.strip()] = value.strip()
    return wanted


def read_condition_file(path: Path) -> list[dict]:
    """One condition per non-empty line (`Smiling=1,Eyeglasses=0` or `class=cat`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FmkitError(
            f"{path} is not a text file; --cond-file takes one line of conditions per image"
        ) from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append(parse_conditions(line.split(","), f"{path}:{number}"))
    if not rows:
        raise FmkitError(f"{path} holds no conditions")
    return rows
