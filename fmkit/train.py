"""The training loop: `train` reads as a sequence of named steps (build, resume, step, periodic
actions, final save); the objective it optimises is a plugin it never looks inside."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fmkit import __version__ as fmkit_version
from fmkit import checkpoint, distributed
from fmkit.augment import hflip
from fmkit.batch import Batch
from fmkit.compiled import FirstCompiledCall
from fmkit.config import TrainConfig, objective_options
from fmkit.data import TrainingData
from fmkit.device import choose, resolve_device
from fmkit.errors import FmkitError
from fmkit.folders import write_json
from fmkit.generator import Generator, ModelSpec, build_backbone, init_from
from fmkit.interrupt import Interrupted, StopRequests
from fmkit.logs import RunLog, check_logger
from fmkit.lr import learning_rate, plan
from fmkit.nonfinite import NonFinite
from fmkit.objective import Draws, Objective, as_model, backbone_options
from fmkit.options import check_options
from fmkit.phema import FOLDER as PHEMA_FOLDER
from fmkit.phema import (
    PowerEMA,
    default_interval,
    drop_after,
    parse_widths,
    snapshot_name,
    storage_note,
)
from fmkit.plugins import component_info, registry
from fmkit.progress import TrainingBar, startup_lines
from fmkit.run_folder import claim_run
from fmkit.space import build_space
from fmkit.state import EMA, TrainState
from fmkit.teacher import Teacher
from fmkit.visualize import training_grid

__all__ = ["train"]


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train `cfg.backbone` on `cfg.dataset` with `cfg.objective`; returns the final
    checkpoint's path.

    Under torchrun every process calls this; rank 0 alone writes outputs. Outputs in
    `cfg.output`: config.json, checkpoint_epoch_N / checkpoint_step_N / checkpoint_final
    (.safetensors), samples_epoch_N / samples_step_N / final_samples_grid (.png, from the EMA
    weights) and metrics.jsonl. Paths are recorded absolute.

    The first SIGINT or SIGTERM finishes the step, saves a checkpoint and raises Interrupted
    (which says how to resume); a second SIGINT aborts.
    """
    info = distributed.from_environment()
    completed = False
    try:
        final = Run(cfg.with_absolute_paths(), info, progress).execute(resume)
        completed = True
        return final
    except Interrupted:
        raise
    except FmkitError as exc:
        raise FmkitError(f"rank {info.rank}: {exc}" if info.enabled else str(exc)) from None
    except dist.DistBackendError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmkitError(
            f"rank {info.rank}: lost contact with another rank, which probably died ({first}); "
            "the checkpoints written so far are intact"
        ) from None
    finally:
        distributed.shutdown(together=completed)


@dataclass
class StepResult:
    loss: torch.Tensor  # (), this rank's mean loss over its micro-batches
    grad_norm: torch.Tensor  # ()
    lr: float
    logs: dict[str, torch.Tensor]


class Run:
    """One training run: what `train` builds and then drives."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, progress: bool) -> None:
        self.cfg, self.info, self.progress = cfg, info, progress
        self.out = Path(cfg.output)
        self.last_saved: Path | None = None

    def execute(self, resume: bool) -> Path:
        self.resuming = resume
        self.check(resume)  # every name, option and the output folder, before any data
        self.device = distributed.init(
            self.info, resolve_device(self.cfg.device), self.cfg.dist_timeout
        )
        torch.manual_seed(self.cfg.seed)
        self.training = TrainingData(
            self.cfg, self.info, self.device, self.micro_batch, self.progress, self.space
        )
        self.data = self.training.spec
        self.total, self.schedule = plan(self.cfg, self.training.steps_per_epoch)
        self.phema_every = None
        if self.phema_widths:
            self.phema_every = self.cfg.phema_every or default_interval(self.total)
        self.build_model()
        if resume:
            self.resume()
        self.summary()
        with StopRequests(announce=self.info.is_main) as self.stop:
            try:
                self.loop()  # the run folder is written once the first step has worked
                self.snapshot()  # the last step's, for a reconstruction at the end
                if self.stopped:
                    self.interrupted()
                final = self.save("final")
                self.grid("final_samples_grid")
            finally:
                self.close_outputs()
        return final

    # Build.

    def check(self, resume: bool) -> None:
        cfg, info = self.cfg, self.info
        self.folder = claim_run(self.out, resume)
        if cfg.batch_size % (info.world_size * cfg.grad_accum):
            raise FmkitError(
                f"--batch-size {cfg.batch_size} is the global batch; it must divide evenly over "
                f"{info.world_size} process(es) x --grad-accum {cfg.grad_accum}"
            )
        self.local_batch = cfg.batch_size // info.world_size  # this rank's images per step
        self.micro_batch = self.local_batch // cfg.grad_accum  # images per forward/backward
        self.objective = self.build_objective()
        self.logger = check_logger(cfg.logger) if info.is_main else "none"
        backbones = registry("backbones")  # options checked before any download
        if cfg.condition != "none":
            registry("conditions").get(cfg.condition)  # an unknown kind lists the known ones
        if cfg.condition != "none" and not backbones.accepts(cfg.backbone, "data"):
            raise FmkitError(
                f"backbone '{cfg.backbone}' takes no conditions (its factory has no `data` "
                f"parameter); train it with --condition none"
            )
        self.phema_widths = parse_widths(cfg.phema)
        self.space = build_space(cfg.space, cfg.space_opts)
        try:
            self.space.shape(cfg.channels, cfg.image_size)  # the data may still say channels
        except ValueError as exc:
            raise FmkitError(f"space '{cfg.space}': {exc}") from None
        self.backbone_opts = backbone_options(
            self.objective, cfg.objective, cfg.backbone, cfg.backbone_opts
        )
        supplied = dict.fromkeys((*backbones.fixed, *backbones.optional))
        check_options(
            backbones.get(cfg.backbone).factory,
            self.backbone_opts,
            f"backbone '{cfg.backbone}'",
            supplied,
        )

    def build_objective(self) -> Objective:
        cfg = self.cfg
        path = registry("paths").build(cfg.path, cfg.path_opts)
        objectives = registry("objectives")
        objectives.get(cfg.objective)
        self.objective_opts = objective_options(
            cfg, lambda name: objectives.accepts(cfg.objective, name)
        )
        supplied = {"path": path}
        if objectives.accepts(cfg.objective, "teacher"):  # a distillation objective
            if not cfg.init_from:
                raise FmkitError(
                    f"objective '{cfg.objective}' learns from a trained model: name it with "
                    "--init-from RUN (its weights also start the student)"
                )
            supplied["teacher"] = Teacher(cfg.init_from)
        return objectives.build(cfg.objective, self.objective_opts, **supplied)

    def build_model(self) -> None:
        cfg, device, info = self.cfg, self.device, self.info
        cuda = device.type == "cuda"
        fast = choose(device, cfg.precision, cfg.channels_last, cfg.fused_adamw, cfg.compile)
        self.bf16, self.memory_format, self.compiled = fast.bf16, fast.memory_format, fast.compile
        self.spec = ModelSpec(
            backbone=cfg.backbone,
            backbone_opts=self.backbone_opts,
            data=self.data,
            objective=cfg.objective,
            objective_opts=self.objective_opts,
            path=cfg.path,
            path_opts=cfg.path_opts,
            sampling=self.objective.sampling(),
            fmkit_version=fmkit_version,
            space=cfg.space,
            space_opts=self.space.record(cfg.space_opts),
            components={
                "backbone": component_info("backbones", cfg.backbone),
                "dataset": component_info("datasets", cfg.dataset),
                "path": component_info("paths", cfg.path),
                "objective": component_info("objectives", cfg.objective),
                "space": component_info("spaces", cfg.space),
            },
        )
        model = build_backbone(self.spec)
        self.parameter_count = sum(p.numel() for p in model.parameters())
        if cfg.init_from and not self.resuming:  # a resumed run has weights of its own
            init_from(model, self.spec, cfg.init_from, self.objective.backbone_needs)
        model = model.to(device, memory_format=self.memory_format)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fast.fused_adamw
        )
        self.state = TrainState(model, EMA(model, cfg.ema_decay, cfg.ema_warmup), optimizer)
        if self.phema_widths:
            self.state.phema = PowerEMA(model, self.phema_widths)
        self.parameters = list(model.parameters())
        trained: nn.Module = model
        self.ddp: DistributedDataParallel | None = None
        if info.enabled:  # gradients are averaged over ranks during backward
            trained = self.ddp = DistributedDataParallel(
                model, device_ids=[device.index] if cuda else None
            )
            # In channels_last, a 1x1 convolution's weight (O, I, 1, 1) has two valid layouts
            # that differ only in the strides of its size-1 dimensions; autograd may hand DDP
            # the other one, and DDP then copies it into its bucket (what it does anyway for a
            # gradient freed each step) and warns once per rank. Nothing is wrong: not shown.
            warnings.filterwarnings(
                "ignore", message="Grad strides do not match bucket view strides"
            )
        self.model = eager = as_model(trained)
        if fast.compile:
            self.model = as_model(torch.compile(trained))

        def fall_back() -> None:
            self.model, self.compiled = eager, False

        self.first_step = FirstCompiledCall(
            fast.compile, fall_back, info.is_main, "training step", "training without it"
        )

    def resume(self) -> None:
        latest = checkpoint.find_latest(self.out)
        if latest is None:
            return
        note = self.state.restore(latest, self.info, self.device)
        self.last_saved = latest
        if self.info.is_main:
            state = self.state
            drop_after(self.out, state.step)  # those steps are trained again
            print(f"resumed from {latest} at step {state.step} (epoch {state.epoch}){note}")

    def summary(self) -> None:
        """What is about to train, on what, where and for how long (rank 0)."""
        if self.progress and self.info.is_main:
            training = self.training
            lines = startup_lines(
                self.cfg, self.data, parameters=self.parameter_count, device=self.device,
                bf16=self.bf16, compiled=self.compiled, processes=self.info.world_size,
                micro_batch=self.micro_batch,
                images=None if training.iterable else len(training.dataset),
                steps_per_epoch=training.steps_per_epoch, total=self.total,
                schedule=self.schedule, resumed_at=self.state.step,
                generates_images=self.space.images,
                snapshots=storage_note(self.phema_widths, self.phema_every, self.state.model),
            )  # fmt: skip
            print("\n".join(lines), flush=True)

    # Train.

    def loop(self) -> None:
        """Steps until the limit, or until a stop is asked for (`self.stopped`); then the last
        step is logged if it was not."""
        cfg, state = self.cfg, self.state
        self.window = (time.perf_counter(), 0)  # start of the metrics window, images in it
        self.bad = NonFinite(self.device)
        self.logs = self.bar = self.result = None
        self.stopped = False
        self.logged = state.step
        while not self.finished() and (cfg.max_steps is not None or state.epoch < cfg.epochs):
            self.steps_this_epoch = 0
            epoch = self.training.epoch(state.epoch, state.batch_in_epoch, cfg.grad_accum)
            for micro in epoch:
                self.result = self.first_step.run(lambda micro=micro: self.step(micro))
                if self.bar is None:
                    self.open_outputs()
                self.bar.update(self.result.loss)
                # Every rank stops after the same step: the first signal anywhere counts.
                self.stopped = distributed.any_rank(self.stop.requested, self.info)
                if self.stopped:
                    break
                self.periodic(self.result)
                if self.finished():
                    break
            else:
                self.end_epoch()
            if self.stopped:
                break
        if self.result is not None and self.logged < state.step:
            self.log(self.result)  # metrics.jsonl always ends with the last step

    def open_outputs(self) -> None:
        """Write config.json, open metrics.jsonl and the logger, and start the progress bar:
        only once the first step has worked, so a run stopped by a mistake that only the model
        or the objective could find leaves nothing behind."""
        cfg, state = self.cfg, self.state
        if self.info.is_main:
            if self.last_saved is None:  # a new run, or one that never saved: start it over
                self.folder.retire()
            write_json(self.folder.path("config.json"), cfg.to_dict())
            self.logs = RunLog(self.folder, self.logger, state.step - 1, cfg.to_dict())
        self.bar = TrainingBar(self.total, state.step - 1, self.progress and self.info.is_main)

    def close_outputs(self) -> None:
        for closable in (self.logs, self.bar):
            if closable is not None:
                closable.close()
        self.logs = self.bar = None

    def interrupted(self) -> None:
        """Save where the run stopped and say how to continue it."""
        step = self.state.step
        saved = self.out / f"checkpoint_step_{step}.safetensors"
        if self.last_saved != saved:
            self.last_saved = self.save(f"step_{step}")
        self.close_outputs()
        signum = self.stop.signum or 15  # a rank that got no signal stops with the others
        raise Interrupted.after(signum, step, self.last_saved, self.out, self.info.enabled)

    def finished(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def step(self, micro: list[Batch]) -> StepResult:
        """One optimizer step over this rank's micro-batches."""
        cfg, state, info = self.cfg, self.state, self.info
        loss_sum = torch.zeros((), device=self.device)
        logs: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(micro):
            batch = batch.to(self.device, self.memory_format)
            first = info.rank * self.local_batch + m * self.micro_batch
            rows = slice(first, first + len(batch))
            # Every random draw of the step depends on (seed, step, index in the global batch)
            # only, so one process and eight, with or without accumulation, train alike.
            if cfg.hflip:
                batch = hflip(
                    batch, Draws(cfg.seed, state.step, cfg.batch_size, rows, self.device, "augment")
                )
            batch = batch.map(self.training.encode, lambda v: v)  # images (and paired noise)
            draws = Draws(cfg.seed, state.step, cfg.batch_size, rows, self.device)
            # Only the last micro-batch all-reduces. no_sync is asked of the DDP wrapper itself:
            # a compiled module does not expose it.
            sync = m == len(micro) - 1 or self.ddp is None
            with (
                contextlib.nullcontext() if sync else self.ddp.no_sync(),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
            ):
                loss = self.objective.loss(self.model, batch, draws)
                if m == 0:
                    # Drop last step's gradients only now, between forward and backward as a
                    # plain loop does: on the CPU, freeing them before the forward made the
                    # allocator return and re-fault their pages (measured: 4-8% slower steps).
                    state.optimizer.zero_grad(set_to_none=True)
                (loss.value / cfg.grad_accum).backward()
            loss_sum += loss.value.detach() / cfg.grad_accum
            for key, value in loss.logs.items():
                logs[key] = logs.get(key, 0) + value.detach() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.parameters, cfg.grad_clip if cfg.grad_clip else float("inf")
        )
        # Gradients are averaged over ranks, so a non-finite one stops every rank alike.
        self.bad.record(state.step + 1, loss_sum, grad_norm)
        lr = learning_rate(state.step + 1, cfg.lr, cfg.warmup_steps, self.total, self.schedule)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
        state.average()
        state.step += 1
        state.batch_in_epoch += 1
        self.steps_this_epoch += 1
        self.window = (self.window[0], self.window[1] + cfg.batch_size)
        return StepResult(loss_sum, grad_norm, lr, logs)

    def periodic(self, result: StepResult) -> None:
        """Log, sample and save on step intervals."""
        cfg, step = self.cfg, self.state.step
        if due(cfg.log_every, step):
            self.log(result)
        if due(cfg.sample_every_steps, step):
            self.grid(f"samples_step_{step}")
        if due(cfg.save_every_steps, step):
            self.last_saved = self.save(f"step_{step}")
        if due(self.phema_every, step):
            self.snapshot()

    def end_epoch(self) -> None:
        """Epoch finished: sample and save on epoch intervals."""
        cfg, state = self.cfg, self.state
        if self.steps_this_epoch == 0 and state.batch_in_epoch == 0:
            raise FmkitError(f"dataset '{cfg.dataset}' gave no full batch of {cfg.batch_size}")
        state.epoch += 1
        state.batch_in_epoch = 0
        if due(cfg.sample_every, state.epoch):
            self.grid(f"samples_epoch_{state.epoch}")
        if due(cfg.save_every, state.epoch):
            self.last_saved = self.save(f"epoch_{state.epoch}")

    # Periodic actions.

    def log(self, result: StepResult) -> None:
        self.bad.check(self.state.step, self.last_saved, self.info)
        # One collective for the loss and the objective's logs (whose keys, as Loss says, are
        # the same on every rank and step).
        keys = sorted(result.logs)
        values = torch.stack([result.loss, *(torch.as_tensor(result.logs[k]) for k in keys)])
        values = distributed.mean(values.float(), self.info)
        loss, logs = values[0], dict(zip(keys, values[1:], strict=True))
        self.logged = self.state.step
        if not self.info.is_main:
            return
        start, images = self.window
        row = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss.item(),
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "images_per_s": images / (time.perf_counter() - start),
            **{k: v.item() for k, v in logs.items()},
        }
        self.logs.write(row)
        self.bar.show(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
        self.window = (time.perf_counter(), 0)

    def grid(self, name: str) -> None:
        """A sample grid from the EMA weights, always from the same noise."""
        self.bad.check(self.state.step, self.last_saved, self.info)
        if not self.info.is_main:
            return
        with self.status(f"drawing {name}.png"):
            self.draw_grid(name)

    def status(self, what: str):
        """The bar says what the run is doing meanwhile (the final ones come after it)."""
        return self.bar.doing(what) if self.bar is not None else contextlib.nullcontext()

    def draw_grid(self, name: str) -> None:
        ema = Generator(self.spec, self.state.ema.model)
        paths = self.folder.path(f"{name}.png"), self.folder.path(f"{name}.txt")
        training_grid(ema, self.cfg.num_samples, self.cfg.sample_steps, self.cfg.seed, *paths)

    def snapshot(self) -> None:
        """The post-hoc EMA profiles as they are after this step, in RUN/phema/ (rank 0; the
        profiles are the same on every rank)."""
        phema = self.state.phema
        if phema is None or not self.info.is_main or self.state.step == 0:
            return
        self.folder.add(PHEMA_FOLDER)
        path = self.out / snapshot_name(self.state.step)
        path.parent.mkdir(exist_ok=True)
        with self.status(f"saving {path.name}"):
            phema.snapshot(path)

    def save(self, name: str) -> Path:
        """A checkpoint (collective: every rank takes part)."""
        self.bad.check(self.state.step, self.last_saved, self.info)  # never save diverged weights
        metadata = {
            "config": self.cfg.to_dict(),
            "model": self.spec.to_dict(),  # with the plugins that provide each component
            "components": self.spec.components,  # where checkpoints before model specs kept it
            "fmkit_version": fmkit_version,
        }
        name = f"checkpoint_{name}.safetensors"
        path = self.folder.path(name) if self.info.is_main else self.out / name
        try:
            with self.status(f"saving {name}"):
                return self.state.save(path, metadata, self.info, self.device)
        except FmkitError as exc:  # a full disk, a folder made read-only: say what is safe
            kept = f"{self.last_saved} is intact" if self.last_saved else "none was written yet"
            raise FmkitError(f"{exc}; the last checkpoint {kept}") from None


def due(every: int | None, count: int) -> bool:
    return every is not None and every > 0 and count % every == 0
