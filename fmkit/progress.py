"""What a user watches: the training bar (its loss read at the bar's refresh, not every step,
and a word on what it is doing while grids are drawn or checkpoints written) and the few lines
a run prints before its first step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from fmkit.batch import DataSpec
from fmkit.config import TrainConfig

REFRESH_S = 1.0  # how often the bar reads the loss: one host-device synchronisation a second


class TrainingBar:
    """tqdm over optimizer steps.

    Args:
        total: the run's last step (None: unknown, e.g. shards without --max-steps).
        done: steps already taken (a resumed run).
        enabled: draw it (rank 0 of a run with progress).
    """

    def __init__(self, total: int | None, done: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, initial=done, disable=not enabled, unit="step", dynamic_ncols=True
        )
        self.enabled = enabled
        self.shown = {}
        self.last_read = 0.0

    def update(self, loss: torch.Tensor) -> None:
        """One step done; `loss` (a 0-d tensor, possibly still being computed on the GPU) is
        read only when the bar is due to refresh, so steps stay asynchronous."""
        self.bar.update(1)
        now = time.monotonic()
        if self.enabled and now - self.last_read >= REFRESH_S:
            self.last_read = now
            self.show(loss=f"{loss.item():.4f}")

    def show(self, **values: str) -> None:
        """Set fields of the bar's postfix (loss, img/s), kept until changed."""
        self.shown.update(values)
        self.bar.set_postfix(self.shown, refresh=True)

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """Say `what` in the bar while it is done (a grid, a checkpoint), so it never looks
        frozen."""
        if not self.enabled:
            yield
            return
        self.bar.set_postfix_str(f"{what}...", refresh=True)
        try:
            yield
        finally:
            self.bar.set_postfix(self.shown, refresh=True)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def startup_lines(
    cfg: TrainConfig,
    data: DataSpec,
    *,
    parameters: int,
    device: torch.device,
    bf16: bool,
    processes: int,
    compiled: bool = False,
    micro_batch: int,
    images: int | None,
    steps_per_epoch: int | None,
    total: int | None,
    schedule: str,
    resumed_at: int,
    generates_images: bool = True,
    snapshots: str = "",
) -> list[str]:
    """The lines a run prints before its first step: what trains on what, where and how long,
    and where it writes. `images` and `steps_per_epoch` are None for data of unknown length;
    `generates_images` is False for a model in another space than the images' (it is named);
    `snapshots` says what else the run stores (post-hoc EMA snapshots)."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    size = "unknown size" if images is None else f"{images:,} images"
    kind = data.condition.kind
    cond = "" if kind == "none" else f", conditioned on {kind}"
    per = f"{processes} process{'es' if processes > 1 else ''} x {cfg.grad_accum} x {micro_batch}"
    epoch = "" if steps_per_epoch is None else f"{steps_per_epoch:,} steps per epoch, "
    length = "until the data ends" if total is None else f"{total:,} step{'s' * (total != 1)}"
    start = f", resuming at step {resumed_at:,}" if resumed_at else ""
    lr = f"{cfg.lr:g}"
    if cfg.warmup_steps:
        lr += f" after {cfg.warmup_steps:,} warm-up steps"
    lr += ", constant" if schedule == "constant" else f", {schedule} decay to 0"
    space = "" if generates_images else f", in the {cfg.space} space"
    return [
        f"model: {cfg.backbone} ({_count(parameters)} parameters), {cfg.objective} on the "
        f"{cfg.path} path{cond}{space}",
        f"data: {cfg.dataset}, {size} at {data.image_size}x{data.image_size}; {epoch}{length}"
        f"{start}",
        f"device: {where}, {'bf16' if bf16 else 'fp32'}, compile {'on' if compiled else 'off'}; "
        f"batch {cfg.batch_size} ({per}); lr {lr}",
        f"output: {cfg.output}" + (f"; {snapshots}" if snapshots else ""),
    ]


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


class SamplingBar:
    """Progress of sampling, by image, with the running NFE of the batch in flight (an
    adaptive solver can spend minutes on one batch): pass `watch` as `Generator.sample`'s or
    `generate`'s `watch`, and `update(n)` when a batch is done. Drawn only on a terminal
    unless `enabled` says otherwise.

    Args:
        total: images (or pairs) in all.
        desc: what is being made ("sampling", "reflow pairs").
        unit: tqdm's unit.
        done: already made (a resumed reflow).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "img",
        done: int = 0,
        enabled: bool | None = None,
        leave: bool = True,
    ) -> None:
        self.bar = tqdm(
            total=total, initial=done, desc=desc, unit=unit, leave=leave,
            disable=None if enabled is None else not enabled,
        )  # fmt: skip
        self.last_draw = 0.0

    def watch(self, nfe: int) -> None:
        self.bar.set_postfix(nfe=nfe, refresh=False)
        now = time.monotonic()
        if now - self.last_draw >= REFRESH_S:  # redraw at most once a second
            self.last_draw = now
            self.bar.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def __enter__(self) -> SamplingBar:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
