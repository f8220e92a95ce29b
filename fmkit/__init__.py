"""fmkit: flow-matching image generation with plugins.

Public API; the seed project's names (`UNet`, `FlowMatching`, `load_celeba_data`,
`visualize_samples`) are kept so its scripts keep working.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fmkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from fmkit.batch import UNSPECIFIED, Batch, Condition, DataSpec
from fmkit.conditions import ConditionKind
from fmkit.errors import FmkitError
from fmkit.flow import FlowMatching
from fmkit.generator import Generator, ModelSpec
from fmkit.hookspecs import hookimpl
from fmkit.objective import Draws, Loss, Objective
from fmkit.options import parse_options
from fmkit.path import PathSample, ProbabilityPath
from fmkit.plugins import list_plugins, registry
from fmkit.registry import Registry
from fmkit.solver import Solution, Solver, Velocity, build_solver, integrate
from fmkit.visualize import visualize_samples


def __getattr__(name: str):
    # The seed's UNet and CelebA loader, and the training-time distributions, live in the
    # built-in plugins; import them on first use so `import fmkit` does not build the plugins.
    if name == "UNet":
        from fmkit_plugins.unet import UNet

        return UNet
    if name == "load_celeba_data":
        from fmkit_plugins.celeba import load_celeba_data

        return load_celeba_data
    if name == "sample_time":  # the distributions the built-in objectives share
        from fmkit_plugins.times import sample_time

        return sample_time
    raise AttributeError(f"module 'fmkit' has no attribute {name!r}")


__all__ = [
    "UNSPECIFIED",
    "Batch",
    "Condition",
    "ConditionKind",
    "DataSpec",
    "Draws",
    "FlowMatching",
    "FmkitError",
    "Generator",
    "Loss",
    "ModelSpec",
    "Objective",
    "PathSample",
    "ProbabilityPath",
    "Registry",
    "Solution",
    "Solver",
    "UNet",
    "Velocity",
    "__version__",
    "build_solver",
    "hookimpl",
    "integrate",
    "list_plugins",
    "load_celeba_data",
    "parse_options",
    "registry",
    "sample_time",
    "visualize_samples",
]
