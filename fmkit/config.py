"""Training configuration: one dataclass, the single source of truth for `fmkit train`'s flags
(their help, types and ranges live with each field), TOML files, and the config stored in
checkpoints (as a dict, rebuilt with `TrainConfig.from_dict`)."""

from __future__ import annotations

import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fmkit.errors import FmkitError
from fmkit.options import conform

SEED_MAX = 2**32 - 1  # the largest seed of every command (what every RNG fmkit uses takes)


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    min_open: bool = False,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    zero_is_none: bool = False,
    metavar: str | None = None,
    resumable: bool = False,
) -> Any:
    """A TrainConfig field with what its flag needs.

    Args:
        help: the flag's help text (also what the field means).
        min, min_open, max: the accepted range of a number.
        choices: the accepted strings.
        zero_is_none: the flag takes 0 to mean None ("off").
        resumable: `--resume` may change it (limits, intervals, logging, workers, where things
            are): it changes nothing the run has learned from or would draw differently.
    """
    metadata = {
        "help": help,
        "min": min,
        "min_open": min_open,
        "max": max,
        "choices": choices,
        "zero_is_none": zero_is_none,
        "metavar": metavar,
        "resumable": resumable,
    }
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


SCHEDULES = ("constant", "cosine", "linear")  # fmkit.train.learning_rate

# What a run recorded before a key existed ran as this value (not today's default, which may
# differ): a resumed old run keeps training as it did.
BEFORE_KEY = {"lr_schedule": "constant", "logger": "auto", "space": "pixels", "phema": "off"}


@dataclass
class TrainConfig:
    backbone: str = option("unet", "Registered backbone (fmkit list backbones).")
    backbone_opts: dict = option({}, "Option for the backbone (see `fmkit show backbones NAME`).")
    dataset: str = option(
        "celeba",
        "Registered dataset (fmkit list datasets); unset, a --data-dir that holds a prepared "
        "array (fmkit prepare, fmkit reflow) is read as `prepared`.",
    )
    dataset_opts: dict = option({}, "Option for the dataset (see `fmkit show datasets NAME`).")
    path: str = option("linear", "Registered probability path (fmkit list paths).")
    path_opts: dict = option({}, "Option for the path (see `fmkit show paths NAME`).")
    space: str = option(
        "pixels",
        "Where the model generates (fmkit list spaces): pixels, or patchify (space-to-depth; "
        "--space-opt factor=2|4).",
    )
    space_opts: dict = option({}, "Option for the space (see `fmkit show spaces NAME`).")
    init_from: str | None = option(
        None,
        "Start from the EMA weights of this run directory, checkpoint or model folder (e.g. a "
        "reflow teacher); its backbone, path, resolution and condition become the defaults.",
        metavar="RUN",
    )
    objective: str = option("flow_matching", "Registered training objective.")
    objective_opts: dict = option(
        {}, "Option for the objective (see `fmkit show objectives NAME`)."
    )
    condition: str = option(
        "none",
        "Train on the dataset's conditions of this kind (fmkit list conditions), or none "
        "(ignore them).",
    )
    data_dir: str = option(
        "./data", "Dataset root (celeba downloads into DATA_DIR/celeba).", resumable=True
    )
    split: str = option("train", "Dataset split to train on (e.g. celeba: train, valid, all).")
    image_size: int = option(64, "Training resolution (square).", min=1)
    channels: int = option(3, "Image channels, for datasets that do not describe theirs.", min=1)
    hflip: bool = option(True, "Random horizontal flips, drawn per image from the step's seed.")
    batch_size: int = option(
        32, "Global batch: split over torchrun processes and --grad-accum micro-batches.", min=1
    )
    grad_accum: int = option(1, "Micro-batches per optimizer step (per process).", min=1)
    epochs: int = option(
        50, "Passes over the data (ignored when --max-steps is set).", min=1, resumable=True
    )
    max_steps: int | None = option(
        None, "Stop after N optimizer steps (overrides --epochs).", min=1, resumable=True
    )
    lr: float = option(3e-4, "AdamW learning rate after warm-up.", min=0, min_open=True)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    warmup_steps: int = option(0, "Linear learning-rate warm-up from 0 (0: none).", min=0)
    lr_schedule: str | None = option(
        None,
        "Learning rate after warm-up: cosine or linear decay to 0 at the last step, or "
        "constant [default: cosine when the run's length is known (--max-steps, or data of "
        "known size), else constant; docs/benchmarks.md compares them].",
        choices=SCHEDULES,
    )
    grad_clip: float | None = option(
        1.0, "Max global gradient norm (0: off).", min=0, zero_is_none=True
    )
    ema_decay: float = option(0.9999, "Target EMA decay.", min=0, max=1)
    ema_warmup: float = option(
        10.0, "EMA decay ramp: update n uses min(--ema-decay, n / (n + W)); 0 turns it off.", min=0
    )
    phema: str = option(
        "0.05,0.10",
        "Post-hoc EMA (Karras et al. 2024): relative widths of the power-function EMA profiles "
        "kept and stored in RUN/phema/, from which `fmkit ema` reconstructs any width after "
        "training; 'off' turns them off. Each snapshot holds every profile in float32 (two: "
        "8 bytes per parameter, 72 MB for the default 9.0M UNet).",
        metavar="SIGMA,...",
    )
    phema_every: int | None = option(
        None,
        "Steps between post-hoc EMA snapshots [default: 1/16 of the run's steps when its "
        "length is known (16 snapshots), else 5000].",
        min=1,
        resumable=True,
    )
    time_sampling: str | None = option(
        None,
        "Training times of an objective that takes them: uniform, logit_normal (--time-loc/"
        "--time-scale) or edm [default: the objective's own; flow matching: logit_normal].",
    )
    time_loc: float | None = option(
        None, "logit_normal location (0: centred on t = 0.5) [default: the objective's]."
    )
    time_scale: float | None = option(
        None, "logit_normal scale [default: the objective's].", min=0, min_open=True
    )
    coupling: str | None = option(
        None,
        "Noise-image pairing of flow matching: independent, ot (minibatch optimal transport "
        "over the global batch) or sinkhorn [default: the objective's; independent].",
    )
    save_every: int | None = option(
        10, "Checkpoint every N epochs (0: off).", min=0, zero_is_none=True, resumable=True
    )
    sample_every: int | None = option(
        5, "Sample grid every N epochs (0: off).", min=0, zero_is_none=True, resumable=True
    )
    save_every_steps: int | None = option(None, "Checkpoint every N steps.", min=1, resumable=True)
    sample_every_steps: int | None = option(
        None, "Sample grid every N steps.", min=1, resumable=True
    )
    num_samples: int = option(64, "Images per grid.", min=1, resumable=True)
    sample_steps: int | None = option(
        None,
        "Steps of the grids' sampler [default: the model's, e.g. ab2 with 20].",
        min=1,
        resumable=True,
    )
    log_every: int = option(50, "Steps per metrics.jsonl line.", min=1, resumable=True)
    logger: str = option(
        "auto",
        "Where metrics go besides metrics.jsonl: tensorboard, wandb (Weights & Biases; "
        "WANDB_MODE=offline writes local files), none, or auto (tensorboard when installed).",
        choices=("auto", "tensorboard", "wandb", "none"),
        resumable=True,
    )
    output: str = option("results", "Run directory.", resumable=True)
    seed: int = option(
        0, "Seeds data order, noise, times, flips and initialisation.", min=0, max=SEED_MAX
    )
    device: str = option("auto", "Device.", choices=("auto", "cpu", "cuda"))
    num_workers: int | None = option(
        None, "DataLoader workers [default: 0 on the CPU, up to 8 per GPU].", min=0,
        resumable=True,
    )  # fmt: skip
    cache_dataset: bool = option(
        True,
        "Decode image files once into a prepared array in $FMKIT_CACHE (~/.cache/fmkit).",
        resumable=True,
    )
    precision: str = option(
        "auto",
        "auto (bf16 on CUDA, fp32 on the CPU), fp32 or bf16.",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool | None = option(
        None,
        "torch.compile the backbone for training [default: on CUDA, off on the CPU]; if the "
        "compiler fails, training goes on without it after one warning.",
        resumable=True,
    )
    channels_last: bool | None = option(None, "NHWC memory format [default: on CUDA only].")
    fused_adamw: bool | None = option(None, "One-kernel AdamW [default: on CUDA only].")
    dist_timeout: float = option(
        600.0,
        "Seconds a rank waits for the others under torchrun before failing.",
        min=1,
        resumable=True,
    )

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Rebuild from a dict (a checkpoint's, or merged flags); keys of older versions are
        carried over (see `normalise`), unknown ones ignored."""
        data = normalise(data)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_record(cls, data: dict) -> TrainConfig:
        """A config a run recorded (config.json, a checkpoint's metadata): keys it predates
        take the value it ran with (BEFORE_KEY), not today's default."""
        return cls.from_dict({**BEFORE_KEY, **data})

    def to_dict(self) -> dict:
        return asdict(self)

    def with_absolute_paths(self) -> TrainConfig:
        """The same config with --data-dir, --output and a local --init-from made absolute, as
        a run records them: its commands then work from any working directory."""
        init_from = self.init_from
        if init_from and Path(init_from).expanduser().exists():
            init_from = _absolute(init_from)
        return replace(
            self,
            data_dir=_absolute(self.data_dir),
            output=_absolute(self.output),
            init_from=init_from,
        )


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# Options of the flow-matching objective that also have train flags of their own (from before
# objectives were plugins); they reach the objective when its factory takes them.
OBJECTIVE_FLAGS = ("time_sampling", "time_loc", "time_scale", "coupling")


def objective_options(cfg: TrainConfig, accepts) -> dict:
    """The objective's options: --objective-opt values, plus the flags in OBJECTIVE_FLAGS that
    were set (None leaves the objective's own default) and that the objective takes
    (`accepts(name)`); setting one it does not take is an error."""
    options = dict(cfg.objective_opts)
    for name in OBJECTIVE_FLAGS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not accepts(name):
            flag = "--" + name.replace("_", "-")
            raise FmkitError(f"{flag} is not an option of objective '{cfg.objective}'")
        options.setdefault(name, value)
    return options


def normalise(values: dict) -> dict:
    """Flags, TOML keys and old checkpoints' configs in today's form: 0 means None where a
    field says so; `flip` and `split`, once dataset options, are the train options `hflip` and
    `split`; `labels` (ignored by training then) is dropped."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name, f in by_name.items():
        if f.metadata.get("zero_is_none") and values.get(name) == 0:
            values[name] = None
    dataset_opts = dict(values.get("dataset_opts") or {})
    if "flip" in dataset_opts:
        try:
            values.setdefault("hflip", conform(dataset_opts.pop("flip"), bool))
        except TypeError:
            raise FmkitError("--dataset-opt flip expects true or false") from None
    if "split" in dataset_opts:
        values["split"] = dataset_opts.pop("split")
    if "labels" in dataset_opts:  # once a dataset option; the labels were never trained on
        dataset_opts.pop("labels")
    if "dataset_opts" in values:
        values["dataset_opts"] = dataset_opts
    return values


def dataset_options(options: dict) -> dict:
    """Dataset options given outside training (prepare, eval) in today's form: `flip` (now a
    training option) has no effect there and is dropped; `labels` became --condition."""
    options = dict(options)
    options.pop("flip", None)
    if "labels" in options:
        raise FmkitError(
            "the dataset option labels is now --condition KIND (fmkit list conditions)"
        )
    return options


def check_value(name: str, value: Any) -> Any:
    """`value` of the train option `name` as TrainConfig holds it (0 is None where the field
    says so), or ValueError saying what it must be. The one check of every value: flags (their
    click type, `cli.ConfigValue`) and TOML files alike."""
    f = _FIELDS[name]
    meta, hint = f.metadata, _HINTS[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if value is None and optional:
        return None
    if base is dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a table of KEY = VALUE options, got {value!r}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"must be one of {', '.join(meta['choices'])}, got {value!r}")
        return value
    number = (int,) if base is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
        raise ValueError(f"must be {'an integer' if base is int else 'a number'}, got {value!r}")
    if meta.get("zero_is_none") and value == 0:
        return None
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value!r}")
    low, high = meta.get("min"), meta.get("max")
    too_low = low is not None and (value <= low if meta.get("min_open") else value < low)
    if too_low or (high is not None and value > high):
        raise ValueError(f"must be {range_text(meta)}, got {value!r}")
    return base(value)


def range_text(meta: dict) -> str:
    """The accepted range of a numeric field, e.g. ">= 1", "> 0", "between 0 and 1"."""
    low, high = meta.get("min"), meta.get("max")
    if meta.get("zero_is_none") and low is None:
        low = 0
    if low is not None and high is not None:
        return f"between {_number(low)} and {_number(high)}"
    if low is not None:
        off = " (0: off)" if meta.get("zero_is_none") else ""
        return f"{'>' if meta.get('min_open') else '>='} {_number(low)}{off}"
    return f"<= {_number(high)}" if high is not None else "any number"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def read_toml(path: Path) -> dict:
    """A TOML file of train options (the flags' names, `-` or `_`): unknown keys and values
    the flags would refuse are errors naming the file and the key."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FmkitError(f"{path}: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise FmkitError(
            f"{path}: unknown key '{unknown[0]}'; keys are the train flags, e.g. batch_size"
        )
    checked = {}
    for key, value in data.items():
        try:
            checked[key] = check_value(key, value)
        except ValueError as exc:
            raise FmkitError(f"{path}: {key} {exc}") from None
    return checked


def resolve(flags: dict[str, Any], given: set[str], toml: Path | None = None) -> TrainConfig:
    """The config of a `fmkit train` call: defaults < the TOML file < flags given on the
    command line. `*_opts` dicts are merged key by key."""
    values = read_toml(toml) if toml else {}
    for name, value in flags.items():
        if name.endswith("_opts"):
            values[name] = {**values.get(name, {}), **value}
        elif name in given:
            values[name] = value
    values = normalise(values)  # before defaults: `--dataset-opt flip=false` beats hflip's
    if values.get("init_from"):
        _model_defaults(values, values["init_from"])
    if "dataset" not in values and _is_prepared(values.get("data_dir", flags.get("data_dir"))):
        values["dataset"] = "prepared"  # what `fmkit prepare` and `fmkit reflow` write
    for name, value in flags.items():
        values.setdefault(name, value)
    return TrainConfig.from_dict(values)


def _is_prepared(data_dir: str | None) -> bool:
    root = Path(data_dir) if data_dir else None
    return root is not None and (root / "meta.json").is_file() and (root / "images.npy").is_file()


def _model_defaults(values: dict, source: str) -> None:
    """Fill what `--init-from`'s model fixes (backbone, path, resolution, channels, condition)
    where neither a flag nor the TOML file set it; its options go under those given."""
    from fmkit.generator import read_spec

    spec = read_spec(source)
    model = {
        "backbone": spec.backbone,
        "path": spec.path,
        "image_size": spec.data.image_size,
        "channels": spec.data.channels,
        "condition": spec.data.condition.kind,
        "space": spec.space,
    }
    for name, value in model.items():
        values.setdefault(name, value)
    if values["backbone"] == spec.backbone:
        values["backbone_opts"] = {**spec.backbone_opts, **values.get("backbone_opts", {})}
    if values["path"] == spec.path:
        values["path_opts"] = {**spec.path_opts, **values.get("path_opts", {})}
    if values["space"] == spec.space:
        values["space_opts"] = {**spec.space_opts, **values.get("space_opts", {})}


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()
