"""ODE solvers: the interface plugins implement, and the NFE counting every solve gets."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from fmkit.errors import FmkitError

# velocity(t, x): t is a 0-dim tensor, x is (B, C, H, W); returns dx/dt shaped like x.
Velocity = Callable[[Tensor, Tensor], Tensor]


class Solver(ABC):
    """Integrates dx/dt = velocity(t, x) from times[0] to times[-1]."""

    #: True when the solver picks its own steps (a step count does not apply).
    adaptive: bool = False

    @abstractmethod
    def solve(self, velocity: Velocity, x0: Tensor, times: Tensor) -> Tensor:
        """Integrate and return the states at `times`.

        Args:
            velocity: the vector field, called as velocity(t, x).
            x0: (B, C, H, W) state at times[0].
            times: (K,) increasing times, K >= 2.

        Returns:
            (K, B, C, H, W) states at each of `times`; the last is the result.
        """


@dataclass
class Solution:
    """The result of one solve.

    Attributes:
        x: (B, C, H, W) the state at the final time.
        trajectory: (K, B, C, H, W) states at the requested times (or, for a sampler that
            jumps, such as MeanFlow's, the state after each jump).
        nfe: number of velocity evaluations the solver made.
        times: (K,) the times of the trajectory's states.
    """

    x: Tensor
    trajectory: Tensor
    nfe: int
    times: Tensor | None = None


def integrate(solver: Solver, velocity: Velocity, x0: Tensor, times: Tensor) -> Solution:
    """Run `solver` while counting every evaluation of `velocity` (the NFE).

    Counting here, not in each solver, means every solver (third-party ones too) reports the
    NFE the same way.
    """
    nfe = 0

    def counted(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return velocity(t, x)

    trajectory = solver.solve(counted, x0, times)
    return Solution(x=trajectory[-1], trajectory=trajectory, nfe=nfe, times=times)


def build_solver(name: str, steps: int | None = None, options: dict | None = None) -> Solver:
    """The registered solver `name`, given `steps` when it takes a step count.

    Adaptive solvers take no `steps`; they ignore it (check `solver.adaptive` to tell users).
    """
    from fmkit.plugins import registry

    solvers = registry("solvers")
    options = dict(options or {})
    accepts_steps = "steps" in inspect.signature(solvers.get(name).factory).parameters
    if steps is not None and accepts_steps:
        options.setdefault("steps", steps)
    solver = solvers.build(name, options)
    if not isinstance(solver, Solver):
        raise TypeError(f"solver '{name}' factory returned {type(solver).__name__}, not a Solver")
    return solver


def parse_solver_spec(spec: str) -> tuple[str, int | None, dict]:
    """`NAME[:STEPS[:KEY=VALUE...]]` -> (name, steps or None, options); e.g.
    "ab2:8:schedule=shift" -> ("ab2", 8, {"schedule": "shift"}). The one grammar for solver
    lists (`fmkit eval sweep --solvers`, the benchmarks)."""
    from fmkit.options import parse_options

    name, *rest = spec.strip().split(":")
    steps = None
    if rest and rest[0]:
        try:
            steps = int(rest[0])
        except ValueError:
            raise FmkitError(
                f"solver spec {spec!r}: steps must be an integer, got {rest[0]!r}"
            ) from None
    return name, steps, parse_options(rest[1:], f"solver spec {spec!r}")


def solver_from_spec(spec: str) -> Solver:
    """The solver a `parse_solver_spec` string describes."""
    name, steps, options = parse_solver_spec(spec)
    return build_solver(name, steps=steps, options=options)
