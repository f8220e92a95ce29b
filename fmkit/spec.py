"""What a trained model is: its spec (backbone, data, objective, path, sampling defaults),
the folder form of its weights, and building its backbone and objective from the spec.

A model folder (`Generator.save_pretrained` / `from_pretrained`, as diffusers' models do):

    config.json        {"format": "fmkit-generator", "format_version": 1, "model": ModelSpec
                        (backbone, data, objective, path, their options, the plugins that
                        provide them, the sampling defaults), "dtype": "float32" | "float16",
                        "fmkit_version": ...}
    model.safetensors  the backbone's weights (the EMA weights of a run), fp32 or fp16
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fmkit import checkpoint
from fmkit.batch import DataSpec
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, json_file
from fmkit.objective import Objective
from fmkit.sampling import Sampling
from fmkit.space import Space, build_space

CONFIG, WEIGHTS = "config.json", "model.safetensors"
FORMAT = "fmkit-generator"


@dataclass
class ModelSpec:
    """Everything that rebuilds a trained model, and nothing about how it was trained.

    Attributes:
        backbone, backbone_opts: the registered backbone and its options.
        data: what the model generates (channels, resolution, conditions).
        objective, objective_opts: the objective, which says how the model is sampled.
        path, path_opts: the probability path the objective uses.
        components: which plugin, distribution and version provided each component.
        sampling: how it samples unless asked otherwise (None in specs written before
            sampling defaults were saved: its objective's).
        fmkit_version: the fmkit that wrote it (older ones may have had other defaults).
        space, space_opts: where it generates (fmkit.space): the backbone sees and makes
            what the space encodes images to; specs before spaces are "pixels".
    """

    backbone: str
    backbone_opts: dict
    data: DataSpec
    objective: str = "flow_matching"
    objective_opts: dict = field(default_factory=dict)
    path: str = "linear"
    path_opts: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)
    sampling: Sampling | None = None
    fmkit_version: str | None = None
    space: str = "pixels"
    space_opts: dict = field(default_factory=dict)

    def build_space(self) -> Space:
        return build_space(self.space, self.space_opts)

    def model_shape(self) -> tuple[int, int]:
        """(channels, side) of what the backbone sees and generates."""
        try:
            return self.build_space().shape(self.data.channels, self.data.image_size)
        except ValueError as exc:
            raise FmkitError(f"space '{self.space}': {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "backbone_opts": self.backbone_opts,
            "data": self.data.to_dict(),
            "objective": self.objective,
            "objective_opts": self.objective_opts,
            "path": self.path,
            "path_opts": self.path_opts,
            "components": self.components,
            "sampling": None if self.sampling is None else self.sampling.to_dict(),
            "fmkit_version": self.fmkit_version,
            "space": self.space,
            "space_opts": self.space_opts,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], fmkit_version: str | None = None) -> ModelSpec:
        """Rebuild from `to_dict`'s form; `fmkit_version` is the writer's when the dict
        itself does not say (specs before it did)."""
        sampling = data.get("sampling")
        return cls(**{
            **data,
            "data": DataSpec.from_dict(data["data"]),
            "sampling": None if sampling is None else Sampling.from_dict(sampling),
            "fmkit_version": data.get("fmkit_version") or fmkit_version,
        })  # fmt: skip

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> ModelSpec:
        """The spec a checkpoint records; checkpoints written before specs existed (fmkit
        0.1.0 up to this format) are read from their training config."""
        if "model" in meta:
            return cls.from_dict(meta["model"], meta.get("fmkit_version"))
        config = meta.get("config")
        if not isinstance(config, dict) or "backbone" not in config:
            raise FmkitError(
                "this checkpoint records neither a model spec nor a training config; it was "
                f"not written by fmkit (metadata version {meta.get('fmkit_version', 'unknown')})"
            )
        return cls(
            backbone=config["backbone"],
            backbone_opts=config.get("backbone_opts", {}),
            data=DataSpec(config.get("channels", 3), config.get("image_size", 64)),
            path=config.get("path", "linear"),
            path_opts=config.get("path_opts", {}),
            components=meta.get("components", {}),
            fmkit_version=meta.get("fmkit_version"),
        )


def read_spec(source: str | Path) -> ModelSpec:
    """The ModelSpec of a model folder (or Hub repo id), checkpoint or run directory, without
    its weights."""
    from fmkit.hub import locate

    source = locate(source)
    if is_model_folder(source):
        try:
            config = json.loads((source / CONFIG).read_text())
            return ModelSpec.from_dict(config["model"], config.get("fmkit_version"))
        except (OSError, ValueError, KeyError, TypeError):
            raise FmkitError(
                f"{source} is not an fmkit model folder ({CONFIG} unreadable)"
            ) from None
    if not source.exists():
        raise FmkitError(
            f"{source} does not exist (expected a run directory, checkpoint or model folder)"
        )
    return ModelSpec.from_checkpoint_meta(checkpoint.read_metadata(checkpoint.resolve(source)))


# A model folder; those written before folders were marked are recognised by their config.
MODEL_FOLDER = FolderKind(
    "model",
    "an fmkit model folder",
    "fmkit export",
    signature=(CONFIG, WEIGHTS),
    allowed=(CONFIG, WEIGHTS),
    recognise=json_file(CONFIG, format=FORMAT),
)


def is_model_folder(path: Path) -> bool:
    """Whether `path` is a folder `save_pretrained` wrote (a run directory has a config.json
    too, but it describes training, and no model.safetensors)."""
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def build_backbone(spec: ModelSpec, source: str | None = None) -> nn.Module:
    """The backbone `spec` names, built for its data (image size, channels, conditions)."""
    from fmkit.plugins import registry

    backbones = registry("backbones")
    if spec.backbone not in backbones and source is not None:
        origin = spec.components.get("backbone", {})
        dist = origin.get("distribution", "unknown")
        raise FmkitError(
            f"{source} needs backbone '{spec.backbone}', which is not installed; it came from the "
            f"distribution {dist} {origin.get('version', '')}".rstrip()
            + f": pip install {dist}"
        )
    conditional = spec.data.condition.kind != "none"
    if conditional and not backbones.accepts(spec.backbone, "data"):
        raise FmkitError(
            f"backbone '{spec.backbone}' takes no conditions (its factory has no `data` "
            f"parameter), but the data is conditioned on {spec.data.condition.kind}"
        )
    channels, size = spec.model_shape()  # the space's: pixels are the images' own
    return backbones.build(
        spec.backbone,
        {**_older_defaults(backbones.get(spec.backbone).factory, spec), **spec.backbone_opts},
        image_size=size,
        channels=channels,
        data=dataclasses.replace(spec.data, channels=channels, image_size=size),
    )


def _older_defaults(factory, spec: ModelSpec) -> dict:
    """The defaults an older fmkit gave options whose default has changed since: a factory
    lists them as `defaults_before = {"VERSION": {option: old default}}`, and a spec written
    before VERSION that leaves the option out was built with the old default."""
    written = _version(spec.fmkit_version or "0")
    old: dict = {}
    for version, defaults in sorted(getattr(factory, "defaults_before", {}).items(), reverse=True):
        if written < _version(version):
            old.update(defaults)
    return old


def _version(text: str) -> tuple[int, ...]:
    """`"0.2.0"` -> (0, 2, 0); anything after the numbers (a suffix) is ignored."""
    parts = []
    for piece in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def build_objective(spec: ModelSpec) -> Objective:
    from fmkit.plugins import registry

    path = registry("paths").build(spec.path, spec.path_opts)
    return registry("objectives").build(spec.objective, spec.objective_opts, path=path)


def sampling_of(spec: ModelSpec, objective: Objective | None = None) -> Sampling:
    """The spec's sampling defaults, or (older specs) its objective's."""
    if spec.sampling is not None:
        return spec.sampling
    return (objective or build_objective(spec)).sampling()
