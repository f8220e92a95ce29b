"""Exports of a Generator for other runtimes: a diffusers folder and an ONNX velocity network.

Both are checked on export: the exported model is loaded back with its own runtime and its
velocity compared with fmkit's on the same random inputs; above the tolerance the export fails.
`Generator.save_pretrained` (fmkit's own weights-only folder) is the third format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fmkit.batch import Cond
from fmkit.conditions import condition_kind
from fmkit.errors import FmkitError
from fmkit.folders import FolderKind, claim
from fmkit.generator import Generator

DIFFUSERS_TOLERANCE = 1e-5  # relative, fp32: the mapping is exact, only rounding differs
ONNX_TOLERANCE = 1e-4
TIMESTEPS = 1000  # diffusers' timestep = 1000 t, as the built-in UNet's time embedding scales t


@dataclass
class ExportReport:
    """What an export wrote and how closely the exported model matched fmkit's."""

    files: list[Path]
    relative_error: float


def export_diffusers(generator: Generator, out: Path) -> ExportReport:
    """Write `out/unet` (UNet2DModel), `out/scheduler` (FlowMatchEulerDiscreteScheduler in fmkit's
    time convention), `out/model_index.json` for unconditional models (a DDPMPipeline runs it
    as is) and `out/README.md`; the backbone must provide `to_diffusers()`."""
    diffusers = _require("diffusers")
    mapping = getattr(generator.module, "to_diffusers", None)
    if mapping is None:
        raise FmkitError(
            f"export: backbone {generator.spec.backbone!r} has no diffusers mapping (a backbone "
            f"provides one with a to_diffusers() method); --format onnx works for any backbone"
        )
    folder = claim(out, DIFFUSERS_FOLDER)
    config, state = mapping()
    try:
        unet = diffusers.UNet2DModel(**config)
        unet.load_state_dict(state, strict=True)
    except Exception as exc:  # a plugin's mapping that diffusers does not accept
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FmkitError(
            f"export: diffusers rejects the {generator.spec.backbone!r} mapping: {first}"
        ) from None
    # t = 0 is noise in fmkit and the network is fed 1000 t; diffusers' flow-matching scheduler
    # walks sigma from 1 (noise) to 0. invert_sigmas makes it hand the model 1000 (1 - sigma)
    # and step x += (t_next - t) * v: fmkit's Euler, with no change to the weights.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=TIMESTEPS, shift=1.0, invert_sigmas=True
    )
    unconditional = generator.data.condition.kind == "none"
    errors = []

    def write(staging: Path) -> None:
        try:
            if unconditional:
                diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
            else:
                unet.save_pretrained(staging / "unet")
                scheduler.save_pretrained(staging / "scheduler")
        except OSError:
            raise
        except Exception as exc:  # safetensors' own error on a full disk
            raise FmkitError(f"cannot write the export to {out}: {_cause(exc)}") from None
        (staging / "README.md").write_text(_diffusers_note(generator, unconditional))
        loaded = diffusers.UNet2DModel.from_pretrained(staging / "unet", low_cpu_mem_usage=False)
        error = 0.0
        for x, t, cond in check_inputs(generator, 8):
            with torch.no_grad():
                theirs = loaded.eval()(
                    x, TIMESTEPS * t, class_labels=diffusers_labels(generator, cond)
                )
            error = max(error, _relative(theirs.sample, _velocity(generator, x, t, cond)))
        if error > DIFFUSERS_TOLERANCE:
            raise FmkitError(
                f"export: the diffusers model differs from fmkit's by {error:.1e} (relative; "
                f"tolerance {DIFFUSERS_TOLERANCE:.0e})"
            )
        errors.append(error)

    # Installed whole once checked; an earlier diffusers export here (say, of an unconditional
    # model, with a model_index.json this one lacks) leaves no stale files.
    installed = folder.write_staged(write)
    return ExportReport(_files(installed), errors[0])


def export_onnx(generator: Generator, out: Path, batch_size: int = 1) -> ExportReport:
    """Write `out/model.onnx`: velocity = f(x (B, C, H, W), t (B,)[, the condition's values,
    named after its kind]) at a fixed batch and resolution, plus
    `out/README.md`; checked with onnxruntime on the CPU."""
    _require("onnx")
    _require("onnxscript")  # torch's dynamo-based ONNX exporter is written with it
    ort = _require("onnxruntime")
    if batch_size < 1:
        raise FmkitError("export: --batch-size must be at least 1")
    folder = claim(out, ONNX_FOLDER)
    checks = check_inputs(generator, batch_size)
    x, t, cond = checks[0]
    names = ["x", "t", *(cond or {})]
    wrapper = _Velocity(generator.module.float().cpu().eval(), list(cond or {})).eval()
    args = (x, t, *(cond or {}).values())
    errors = []

    def write(staging: Path) -> None:
        path = staging / "model.onnx"
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                input_names=names,
                output_names=["velocity"],
                dynamo=True,
                external_data=False,  # one self-contained file (models under 2 GB)
                verbose=False,
            )
        except Exception as exc:  # the exporter's own errors are long; say which model failed
            raise FmkitError(
                f"export: ONNX export of {generator.spec.backbone!r} failed: {_cause(exc)}"
            ) from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        error = 0.0
        for x, t, cond in checks:
            inputs = (x, t, *(cond or {}).values())
            feed = {name: value.numpy() for name, value in zip(names, inputs, strict=True)}
            theirs = torch.from_numpy(session.run(None, feed)[0])
            error = max(error, _relative(theirs, _velocity(generator, x, t, cond)))
        if error > ONNX_TOLERANCE:
            raise FmkitError(
                f"export: onnxruntime differs from PyTorch by {error:.1e} (relative; tolerance "
                f"{ONNX_TOLERANCE:.0e})"
            )
        (staging / "README.md").write_text(_onnx_note(generator, names, batch_size))
        errors.append(error)

    installed = folder.write_staged(write)
    return ExportReport(_files(installed), errors[0])


def _cause(exc: Exception) -> str:
    """The line of a library's exception worth showing: the operating system's cause when it
    carries one (a full disk inside a safetensors or ONNX error), else its first line."""
    text = str(exc).strip()
    for cause in ("No space left on device", "Read-only file system", "Permission denied"):
        if cause in text:
            return cause
    return text.splitlines()[0] if text else type(exc).__name__


def _files(paths: list[Path]) -> list[Path]:
    """Every file in `paths`, folders expanded."""
    return sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


def _readme_starts(text: str):
    def recognise(root: Path) -> bool:
        try:
            return (root / "README.md").read_text().startswith(text)
        except OSError:
            return False

    return recognise


# Export folders; those written before folders were marked are recognised by their README.
DIFFUSERS_FOLDER = FolderKind(
    "diffusers",
    "a diffusers export",
    "fmkit export --format diffusers",
    signature=("README.md", "unet"),
    allowed=("README.md", "unet", "scheduler", "model_index.json"),
    recognise=_readme_starts("# fmkit model exported for diffusers"),
)
ONNX_FOLDER = FolderKind(
    "onnx",
    "an ONNX export",
    "fmkit export --format onnx",
    signature=("README.md", "model.onnx"),
    allowed=("README.md", "model.onnx"),
    recognise=_readme_starts("# fmkit velocity network in ONNX"),
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
    x = torch.randn(total, data.channels, data.image_size, data.image_size, generator=g)
    t = torch.linspace(0, 1, total)
    batches = []
    for start in range(0, total, batch):
        rows = slice(start, start + batch)
        cond = None if condition.kind == "none" else {condition.kind: labels[rows]}
        batches.append((x[rows], t[rows], cond))
    return batches


def diffusers_labels(generator: Generator, cond: Cond | None) -> Tensor | None:
    """fmkit conditions -> the exported UNet2DModel's `class_labels` (see its README.md)."""
    if cond is None:
        return None
    condition = generator.data.condition
    return condition_kind(condition.kind).class_labels(condition, cond[condition.kind])


class _Velocity(nn.Module):
    """The backbone with its conditions as positional tensors (what an ONNX graph takes)."""

    def __init__(self, module: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.module, self.keys = module, keys

    def forward(self, x: Tensor, t: Tensor, *labels: Tensor) -> Tensor:
        cond = dict(zip(self.keys, labels, strict=True)) if self.keys else None
        return self.module(x, t, cond) if cond is not None else self.module(x, t)


def _velocity(generator: Generator, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
    with torch.no_grad():
        return _Velocity(generator.module, list(cond or {}))(x, t, *(cond or {}).values())


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _require(package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise FmkitError(
            f"export: this format needs {package}: pip install 'fmkit[export]'"
        ) from None


def _conditions_text(generator: Generator, diffusers: bool) -> str:
    condition = generator.data.condition
    if condition.kind == "none":
        return "Unconditional."
    return condition_kind(condition.kind).export_text(condition)[
        "diffusers" if diffusers else "onnx"
    ]


def _labels_line(generator: Generator, onnx: bool, batch: int) -> str:
    """The sampling loop's line choosing the conditions (all unspecified), '' if there are none."""
    condition = generator.data.condition
    if condition.kind == "none":
        return ""
    text = condition_kind(condition.kind).export_text(condition)
    value = text["unspecified_onnx" if onnx else "unspecified_diffusers"].format(batch=batch)
    return f"{'cond' if onnx else 'labels'} = {value}  # unspecified; see above\n"


def _diffusers_note(generator: Generator, unconditional: bool) -> str:
    spec = generator.spec
    size, channels = generator.data.image_size, generator.data.channels
    labels = "" if unconditional else ", class_labels=labels"
    choose = _labels_line(generator, onnx=False, batch=8)
    pipeline = (
        "\n```python\nfrom diffusers import DiffusionPipeline\n\n"
        'pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER")  # DDPMPipeline\n'
        "images = pipe(batch_size=8, num_inference_steps=20).images  # PIL images\n```\n"
        if unconditional
        else ""
    )
    return f"""# fmkit model exported for diffusers

Backbone `{spec.backbone}` trained with fmkit ({spec.objective} objective), {channels} x {size}
x {size} images in [-1, 1]. `unet/` is a diffusers `UNet2DModel`, `scheduler/` a
`FlowMatchEulerDiscreteScheduler`.

## Time convention

fmkit's time runs the other way from diffusers': t = 0 is noise and t = 1 is data, the path is
x_t = t x_data + (1 - t) x_noise, and the network outputs the velocity dx/dt (data minus noise).
The UNet takes `timestep` = 1000 t. The scheduler is configured with `invert_sigmas=True`,
which makes it pass `timestep` = 1000 (1 - sigma) and step x <- x + (t_next - t) v, so the
usual diffusers loop runs fmkit's Euler sampler unchanged.

{_conditions_text(generator, diffusers=True)}
{pipeline}
## A sampling loop

```python
import numpy as np, torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("THIS_FOLDER/unet")
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("THIS_FOLDER/scheduler")
steps = 20
# fmkit's uniform Euler grid; for fmkit's default "shift" grid use s * 3 / (1 + 2 * s).
scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
x = torch.randn(8, {channels}, {size}, {size})
{choose}with torch.no_grad():
    for timestep in scheduler.timesteps:
        v = unet(x, timestep{labels}).sample
        x = scheduler.step(v, timestep, x).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # [0, 1]
```

Classifier-free guidance: v = v_uncond + w (v_cond - v_uncond), with v_uncond from the
"unspecified" labels. `fmkit sample` guides conditional requests with w = 1.5, and only at
0.2 <= t <= 0.8 (elsewhere v = v_cond).
"""


def _onnx_note(generator: Generator, names: list[str], batch_size: int) -> str:
    data = generator.data
    shape = f"({batch_size}, {data.channels}, {data.image_size}, {data.image_size})"
    kind = data.condition.kind
    choose = _labels_line(generator, onnx=True, batch=batch_size)
    feed = "" if kind == "none" else f", {kind!r}: cond"
    return f"""# fmkit velocity network in ONNX

`model.onnx` computes the velocity of backbone `{generator.spec.backbone}`
({generator.spec.objective} objective) at a fixed batch of {batch_size}: inputs
{", ".join(f"`{n}`" for n in names)}; `x` is {shape} float32, `t` ({batch_size},) float32 in
[0, 1] with t = 0 noise and t = 1 data; output `velocity` shaped like `x`.

{_conditions_text(generator, diffusers=False)}

Sample by integrating dx/dt = velocity from t = 0 (x = standard normal noise) to t = 1, e.g.
Euler: x <- x + (t_next - t) velocity(x, t). Images are in [-1, 1].

```python
import numpy as np, onnxruntime as ort

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
x = np.random.randn(*{shape}).astype(np.float32)
{choose}grid = np.linspace(0, 1, 21, dtype=np.float32)
for t, t_next in zip(grid[:-1], grid[1:]):
    feed = {{"x": x, "t": np.full({batch_size}, t, np.float32){feed}}}
    x = x + (t_next - t) * session.run(None, feed)[0]
```
"""
