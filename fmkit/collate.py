"""Collation: dataset items -> one Batch, the labels collated by the condition's kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fmkit.batch import Batch, Cond, Condition
from fmkit.conditions import condition_kind


def cond_from_labels(labels: Sequence[Any] | Tensor, condition: Condition) -> Cond | None:
    """B dataset labels as a condition dict, collated by the condition's kind (a tensor of
    stored labels, a prepared array's, is taken as it is)."""
    if condition.kind == "none":
        return None
    if isinstance(labels, Tensor):
        return {condition.kind: labels}
    return {condition.kind: condition_kind(condition.kind).collate(labels)}


UNCONDITIONAL = Condition()


def collate(items: Sequence[Any] | Batch, condition: Condition = UNCONDITIONAL) -> Batch:
    """A DataLoader's collate_fn: dataset items -> one Batch.

    Items are (C, H, W) images, or (image, label) pairs whose labels become the condition
    `condition` describes; a dataset that already returns a Batch (from `__getitems__`) is
    passed through.
    """
    if isinstance(items, Batch):
        return items
    first = items[0]
    if isinstance(first, (tuple, list)):
        images = torch.stack([item[0] for item in items])
        return Batch(images, cond_from_labels([item[1] for item in items], condition))
    return Batch(torch.stack(list(items)))


class Collate:
    """`collate` bound to a dataset's condition (picklable, for DataLoader workers)."""

    def __init__(self, condition: Condition) -> None:
        self.condition = condition

    def __call__(self, items) -> Batch:
        return collate(items, self.condition)
