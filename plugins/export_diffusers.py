"""The diffusers exporter: a backbone that maps itself to diffusers' `UNet2DModel`
(`to_diffusers()`; the built-in UNet's is fmkit_plugins.unet_diffusers) with a flow-matching
scheduler in fmkit's time convention, loaded back with diffusers and checked."""

from __future__ import annotations

from pathlib import Path

import torch

from fmkit import hookimpl
from fmkit.batch import Cond
from fmkit.conditions import condition_kind
from fmkit.errors import FmkitError
from fmkit.export import (
    Exporter,
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

DIFFUSERS_TOLERANCE = 1e-5  # relative, fp32: the mapping is exact, only rounding differs
TIMESTEPS = 1000  # diffusers' timestep = 1000 t, as the built-in UNet's time embedding scales t


class Diffusers(Exporter):
    """A diffusers UNet2DModel with a flow-matching scheduler, checked with diffusers.

    `unet/` (UNet2DModel), `scheduler/` (FlowMatchEulerDiscreteScheduler in fmkit's time
    convention), `model_index.json` for unconditional models (a DDPMPipeline runs it as is) and
    `README.md`; the backbone must provide `to_diffusers()`."""

    folder = FolderKind(
        "diffusers",
        "a diffusers export",
        "fmkit export --format diffusers",
        signature=("README.md", "unet"),
        allowed=("README.md", "unet", "scheduler", "model_index.json"),
        recognise=readme_starts("# fmkit model exported for diffusers"),
    )

    def write(self, generator: Generator, staging: Path) -> float:
        pixels_only(generator, "diffusers")
        diffusers = require("diffusers")
        mapping = getattr(generator.module, "to_diffusers", None)
        if mapping is None:
            raise FmkitError(
                f"export: backbone {generator.spec.backbone!r} has no diffusers mapping (a "
                "backbone provides one with a to_diffusers() method); --format onnx works for "
                "any backbone"
            )
        config, state = mapping()
        try:
            unet = diffusers.UNet2DModel(**config)
            unet.load_state_dict(state, strict=True)
        except Exception as exc:  # a plugin's mapping that diffusers does not accept
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FmkitError(
                f"export: diffusers rejects the {generator.spec.backbone!r} mapping: {first}"
            ) from None
        # t = 0 is noise in fmkit and the network is fed 1000 t; diffusers' flow-matching
        # scheduler walks sigma from 1 (noise) to 0. invert_sigmas makes it hand the model
        # 1000 (1 - sigma) and step x += (t_next - t) * v: fmkit's Euler, weights unchanged.
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=TIMESTEPS, shift=1.0, invert_sigmas=True
        )
        unconditional = generator.data.condition.kind == "none"
        try:
            if unconditional:
                diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
            else:
                unet.save_pretrained(staging / "unet")
                scheduler.save_pretrained(staging / "scheduler")
        except OSError:
            raise
        except Exception as exc:  # safetensors' own error on a full disk
            raise FmkitError(f"cannot write the export: {cause(exc)}") from None
        (staging / "README.md").write_text(_diffusers_note(generator, unconditional))
        loaded = diffusers.UNet2DModel.from_pretrained(staging / "unet", low_cpu_mem_usage=False)
        error = 0.0
        for x, t, cond in check_inputs(generator, 8):
            with torch.no_grad():
                labels = diffusers_labels(generator, cond)
                theirs = loaded.eval()(x, TIMESTEPS * t, class_labels=labels)
            error = max(error, relative(theirs.sample, velocity(generator, x, t, cond)))
        if error > DIFFUSERS_TOLERANCE:
            raise FmkitError(
                f"export: the diffusers model differs from fmkit's by {error:.1e} (relative; "
                f"tolerance {DIFFUSERS_TOLERANCE:.0e})"
            )
        return error


def diffusers_labels(generator: Generator, cond: Cond | None):
    """fmkit conditions -> the exported UNet2DModel's `class_labels` (see its README.md)."""
    if cond is None:
        return None
    condition = generator.data.condition
    return condition_kind(condition.kind).class_labels(condition, cond[condition.kind])


def _diffusers_note(generator: Generator, unconditional: bool) -> str:
    spec, defaults = generator.spec, generator.defaults
    lo, hi = defaults.guidance_interval
    size, channels = generator.data.image_size, generator.data.channels
    labels = "" if unconditional else ", class_labels=labels"
    choose = labels_line(generator, onnx=False, batch=8)
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

{conditions_text(generator, diffusers=True)}
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
"unspecified" labels. This model's default (what `fmkit sample` does) is w = {defaults.guidance:g},
only at {lo:g} <= t <= {hi:g} (elsewhere v = v_cond).
"""


@hookimpl
def register_exporters(register):
    register("diffusers", Diffusers)
