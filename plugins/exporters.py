"""The built-in exporters: fmkit's own weights-only model folder, and the velocity network as
ONNX (checked with onnxruntime). The diffusers exporter is in fmkit_plugins.export_diffusers."""

from __future__ import annotations

from pathlib import Path

import torch

from fmkit import hookimpl
from fmkit.errors import FmkitError
from fmkit.export import (
    Exporter,
    Velocity,
    cause,
    check_inputs,
    conditions_text,
    labels_line,
    pixels_only,
    readme_starts,
    relative,
    require,
    velocity,
)
from fmkit.folders import FolderKind
from fmkit.generator import Generator
from fmkit.spec import MODEL_FOLDER

ONNX_TOLERANCE = 1e-4  # relative, fp32


class FmkitFolder(Exporter):
    """fmkit's weights-only model folder: config.json + model.safetensors.

    What `fmkit sample --checkpoint DIR` and `Generator.from_pretrained` read (the EMA weights,
    no training state).

    Args:
        fp16: store the weights in float16 (half the file).
    """

    folder = MODEL_FOLDER

    def __init__(self, fp16: bool = False) -> None:
        self.fp16 = fp16

    def write(self, generator: Generator, staging: Path) -> None:
        generator.write_folder(staging, self.fp16)

    def summary(self, generator: Generator, out: Path, files: list[Path], error) -> str:
        count = sum(p.numel() for p in generator.module.parameters())
        size = sum(p.stat().st_size for p in files) / 2**20
        return (
            f"wrote {out}/config.json and model.safetensors ({count:,} parameters, "
            f"{'float16' if self.fp16 else 'float32'}, {size:.1f} MiB)"
        )


class Onnx(Exporter):
    """The velocity network as ONNX, checked with onnxruntime.

    `model.onnx`: velocity = f(x (B, C, H, W), t (B,)[, the condition's values, named after its
    kind]) at a fixed batch and resolution, plus a README.md with a sampling loop; checked with
    onnxruntime on the CPU.

    Args:
        batch_size: the graph's fixed batch size B.
    """

    folder = FolderKind(
        "onnx",
        "an ONNX export",
        "fmkit export --format onnx",
        signature=("README.md", "model.onnx"),
        allowed=("README.md", "model.onnx"),
        recognise=readme_starts("# fmkit velocity network in ONNX"),
    )

    def __init__(self, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise FmkitError("export: --batch-size must be at least 1")
        self.batch_size = batch_size

    def write(self, generator: Generator, staging: Path) -> float:
        pixels_only(generator, "onnx")
        require("onnx")
        require("onnxscript")  # torch's dynamo-based ONNX exporter is written with it
        ort = require("onnxruntime")
        checks = check_inputs(generator, self.batch_size)
        x, t, cond = checks[0]
        names = ["x", "t", *(cond or {})]
        wrapper = Velocity(generator.module.float().cpu().eval(), list(cond or {})).eval()
        path = staging / "model.onnx"
        try:
            torch.onnx.export(
                wrapper,
                (x, t, *(cond or {}).values()),
                str(path),
                input_names=names,
                output_names=["velocity"],
                dynamo=True,
                external_data=False,  # one self-contained file (models under 2 GB)
                verbose=False,
            )
        except Exception as exc:  # the exporter's own errors are long; say which model failed
            raise FmkitError(
                f"export: ONNX export of {generator.spec.backbone!r} failed: {cause(exc)}"
            ) from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        error = 0.0
        for x, t, cond in checks:
            inputs = (x, t, *(cond or {}).values())
            feed = {name: value.numpy() for name, value in zip(names, inputs, strict=True)}
            theirs = torch.from_numpy(session.run(None, feed)[0])
            error = max(error, relative(theirs, velocity(generator, x, t, cond)))
        if error > ONNX_TOLERANCE:
            raise FmkitError(
                f"export: onnxruntime differs from PyTorch by {error:.1e} (relative; tolerance "
                f"{ONNX_TOLERANCE:.0e})"
            )
        (staging / "README.md").write_text(_onnx_note(generator, names, self.batch_size))
        return error


def _onnx_note(generator: Generator, names: list[str], batch_size: int) -> str:
    data = generator.data
    shape = f"({batch_size}, {data.channels}, {data.image_size}, {data.image_size})"
    kind = data.condition.kind
    choose = labels_line(generator, onnx=True, batch=batch_size)
    feed = "" if kind == "none" else f", {kind!r}: cond"
    return f"""# fmkit velocity network in ONNX

`model.onnx` computes the velocity of backbone `{generator.spec.backbone}`
({generator.spec.objective} objective) at a fixed batch of {batch_size}: inputs
{", ".join(f"`{n}`" for n in names)}; `x` is {shape} float32, `t` ({batch_size},) float32 in
[0, 1] with t = 0 noise and t = 1 data; output `velocity` shaped like `x`.

{conditions_text(generator, diffusers=False)}

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


@hookimpl
def register_exporters(register):
    register("fmkit", FmkitFolder)
    register("onnx", Onnx)
