"""The built-in condition kinds: one of K classes, and K binary attributes (CelebA's 40).

Both use UNSPECIFIED (-1) for "not asked for": a class model's embedding table has a row more
for it, and an attribute model embeds each attribute in one of three states (off, on,
unspecified), so any subset can be left out and all left out is the unconditional model.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fmkit import ConditionKind, hookimpl
from fmkit.batch import UNSPECIFIED, Cond, Condition
from fmkit.errors import FmkitError
from fmkit.registry import unknown_name_message

MAX_DIFFUSERS_ATTRIBUTES = 8  # 3**8 = 6,561 rows of diffusers' class-embedding table


def _long(labels: Sequence[Any]) -> Tensor:
    return torch.stack([torch.as_tensor(label) for label in labels]).long()


def _values(cond: Cond | None, key: str, shape: tuple[int, ...], device) -> Tensor:
    if cond is not None and key in cond:
        return cond[key].to(device, torch.long)
    return torch.full(shape, UNSPECIFIED, dtype=torch.long, device=device)


class ClassEmbedding(nn.Module):
    """A class as a row of a (K + 1)-row table, the last row meaning "unspecified" (ADM adds
    its class embedding to the time embedding the same way)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.table = nn.Embedding(size + 1, dim)

    def forward(self, cond: Cond | None, batch: int, device) -> Tensor:
        labels = _values(cond, "class", (batch,), device)  # (B,)
        return self.table(torch.where(labels < 0, self.size, labels))  # (B, dim)

    def class_table(self) -> Tensor:
        """(K + 1, dim) the table itself: class_labels are class indices, K unspecified."""
        return self.table.weight.detach().clone()


class ClassCondition(ConditionKind):
    """One of K named classes (a class-per-folder dataset's subfolders, ImageNet's classes).

    Asked for by name, `class=cat`; an index is spelled `class=#3` (names win: folders 0..11
    sort 0, 1, 10, 11, 2, ...), or an int through the Python API."""

    def collate(self, labels: Sequence[Any]) -> Tensor:
        return _long(labels)  # (B,)

    def unspecified_like(self, values: Tensor) -> Tensor:
        return torch.full_like(values, UNSPECIFIED)

    def embedding(self, condition: Condition, dim: int) -> nn.Module:
        return ClassEmbedding(condition.size, dim)

    def encode(self, condition: Condition, wanted: Mapping[str, Any]) -> Tensor:
        unknown = sorted(set(wanted) - {"class"})
        if unknown:
            raise FmkitError(f"a class-conditional model takes class=NAME, not '{unknown[0]}'")
        names, value = list(condition.names), wanted.get("class")
        if value is None:
            return torch.tensor(UNSPECIFIED)
        if isinstance(value, str) and value in names:
            return torch.tensor(names.index(value))
        if isinstance(value, str) and value[:1] == "#" and value[1:].isdigit():
            value = int(value[1:])
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return torch.tensor(value)
        raise FmkitError(
            unknown_name_message("class", str(value), names) + " (an index: class=#INDEX)"
        )

    def describe(self, condition: Condition) -> list[str]:
        lines = [f"{condition.size} classes (--cond class=NAME or class=#INDEX):"]
        return lines + [f"  {i}  {name}" for i, name in enumerate(condition.names)]

    def grid_rows(self, condition: Condition, rows: int) -> list[tuple[str, dict]]:
        names = condition.names
        return [(f"class={names[r % len(names)]}", {"class": r % len(names)}) for r in range(rows)]

    def controls(self, condition: Condition) -> list[dict]:
        choices = [["", "unspecified"], *([name, name] for name in condition.names)]
        return [{"key": "class", "label": "class", "choices": choices, "style": "select"}]

    def states(self, condition: Condition) -> Tensor:
        return torch.arange(condition.size)

    def examples(self, condition: Condition, generator: torch.Generator) -> Tensor:
        k = condition.size
        return torch.arange(max(4, k + 1)) % (k + 1) - 1  # -1 (unspecified), 0, ..., K-1

    def export_text(self, condition: Condition) -> dict[str, str]:
        names = ", ".join(f"{i} {name}" for i, name in enumerate(condition.names))
        return {
            "onnx": f"Class-conditional: `class` is (B,) int64, the class index ({names}), or "
            f'-1 for "unspecified" (the unconditional half, used by guidance).',
            "onnx_dtype": "np.int64",
            "unspecified_onnx": "np.full(({batch},), -1, np.int64)",
            "diffusers": f"Class-conditional: pass the class index ({names}) as `class_labels`, "
            f'or {condition.size} for "unspecified" (the unconditional half, used by guidance).',
            "unspecified_diffusers": f"torch.full(({{batch}},), {condition.size})",
        }

    def class_labels(self, condition: Condition, values: Tensor) -> Tensor:
        labels = values.long()
        return torch.where(labels == UNSPECIFIED, condition.size, labels)


class AttributesEmbedding(nn.Module):
    """K binary attributes as the sum of K rows of a (3K)-row table, one row per attribute and
    state (off, on, unspecified)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.table = nn.Embedding(3 * size, dim)

    def forward(self, cond: Cond | None, batch: int, device) -> Tensor:
        states = _values(cond, "attributes", (batch, self.size), device)  # (B, K)
        state = torch.where(states < 0, 2, states)  # off 0, on 1, unspecified 2
        index = 3 * torch.arange(self.size, device=device) + state  # (B, K)
        return self.table(index).sum(1)  # (B, dim)

    def class_table(self) -> Tensor:
        """(3**K, dim) diffusers' class-embedding table: row sum_k state_k 3**k holds the sum
        of our rows 3k + state_k."""
        if self.size > MAX_DIFFUSERS_ATTRIBUTES:
            raise FmkitError(
                f"export: {self.size} attributes would need a table of 3**{self.size} class "
                f"embeddings in diffusers; at most {MAX_DIFFUSERS_ATTRIBUTES} attributes can be "
                f"exported (train on a subset: --dataset-opt attributes=A,B,C)"
            )
        table = self.table.weight.detach()
        rows = []
        for combination in itertools.product(range(3), repeat=self.size):
            states = combination[::-1]  # product varies the last slot fastest: attribute 0
            rows.append(table[[3 * i + s for i, s in enumerate(states)]].sum(0))
        return torch.stack(rows)


class AttributesCondition(ConditionKind):
    """K binary attributes (CelebA's Smiling, ...), each on, off or unspecified.

    Asked for as `Smiling=1 Eyeglasses=0`, the others left out (the model fills them in as the
    data would). Condition dropout also leaves out each attribute on its own (the objective's
    attribute_dropout), so any subset can be asked for."""

    def collate(self, labels: Sequence[Any]) -> Tensor:
        return _long(labels)  # (B, K)

    def unspecified_like(self, values: Tensor) -> Tensor:
        return torch.full_like(values, UNSPECIFIED)

    def drop(self, values: Tensor, whole: Tensor, draws, part_rate: float) -> Tensor:
        dropped = whole[:, None] | (draws.uniform(values.shape[1]) < part_rate)  # (B, K)
        return torch.where(dropped, UNSPECIFIED, values)

    def embedding(self, condition: Condition, dim: int) -> nn.Module:
        return AttributesEmbedding(condition.size, dim)

    def encode(self, condition: Condition, wanted: Mapping[str, Any]) -> Tensor:
        names = list(condition.names)
        states = [UNSPECIFIED] * len(names)
        for name, value in wanted.items():
            if name not in names:
                raise FmkitError(unknown_name_message("attribute", name, names))
            # True and False are 1 and 0 too; lists and other unhashables are simply wrong.
            state = (
                {0: 0, 1: 1, "0": 0, "1": 1}.get(value) if isinstance(value, (int, str)) else None
            )
            if state is None:
                raise FmkitError(
                    f"attribute {name} must be 0 or 1 (leave it out for unspecified), got {value!r}"
                )
            states[names.index(name)] = state
        return torch.tensor(states)

    def describe(self, condition: Condition) -> list[str]:
        head = f"{condition.size} attributes (--cond NAME=1 or NAME=0; leave one out: unspecified):"
        return [head, *(f"  {name}" for name in condition.names)]

    def grid_rows(self, condition: Condition, rows: int) -> list[tuple[str, dict]]:
        shown = [("unconditional (all attributes unspecified)", {})]
        for r in range(rows - 1):
            name, value = condition.names[(r // 2) % condition.size], 1 - r % 2
            shown.append((f"{name}={value}", {name: value}))
        return shown[:rows]

    def controls(self, condition: Condition) -> list[dict]:
        choices = [["", "unspecified"], ["1", "on"], ["0", "off"]]
        return [{"key": name, "label": name, "choices": choices, "style": "radio"}
                for name in condition.names]  # fmt: skip

    def examples(self, condition: Condition, generator: torch.Generator) -> Tensor:
        k = condition.size
        fixed = torch.tensor([UNSPECIFIED, 0, 1]).repeat_interleave(k).view(3, k)
        return torch.cat([fixed, torch.randint(-1, 2, (1, k), generator=generator)])  # (4, K)

    def export_text(self, condition: Condition) -> dict[str, str]:
        k = condition.size
        names = ", ".join(f"{i} {name}" for i, name in enumerate(condition.names))
        return {
            "onnx": f"Attribute-conditional ({names}): `attributes` is (B, {k}) int64, 1 on, "
            f"0 off, -1 unspecified; all -1 is the unconditional model.",
            "onnx_dtype": "np.int64",
            "unspecified_onnx": f"np.full(({{batch}}, {k}), -1, np.int64)",
            "diffusers": f"Attribute-conditional ({names}): pass `class_labels` = sum over k of "
            f"state_k * 3**k, with state 0 off, 1 on, 2 unspecified; all unspecified "
            f"({3**k - 1}) is the unconditional model.",
            "unspecified_diffusers": f"torch.full(({{batch}},), {3**k - 1})",
        }

    def class_labels(self, condition: Condition, values: Tensor) -> Tensor:
        states = torch.where(values.long() == UNSPECIFIED, 2, values.long())  # (B, K)
        return (states * 3 ** torch.arange(condition.size)).sum(1)


@hookimpl
def register_conditions(register):
    register("class", ClassCondition)
    register("attributes", AttributesCondition)
