"""The `prepared` dataset: reads what `fmkit prepare` wrote."""

from __future__ import annotations

from pathlib import Path

from fmkit import hookimpl
from fmkit.prepared import PreparedArray


def prepared(
    *,
    root: str,
    image_size: int,
    split: str = "train",
    condition: str = "none",
) -> PreparedArray:
    """A cache written by `fmkit prepare` (memory-mapped uint8; the fastest loader).

    --data-dir is the directory given to `fmkit prepare --out`; the split was chosen then, and
    asking for another one is an error. Labels recorded when it was prepared serve --condition
    (of the kind they were prepared as).
    """
    return PreparedArray(Path(root), image_size, split, condition)


@hookimpl
def register_datasets(register):
    register("prepared", prepared)
