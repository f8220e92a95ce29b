"""fmkit-dit: registers the `dit` backbone with fmkit."""

from fmkit import hookimpl
from fmkit_dit.model import PRESETS, DiT, dit

__all__ = ["DiT", "PRESETS", "dit"]


@hookimpl
def register_backbones(register):
    register("dit", dit)
