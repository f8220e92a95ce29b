"""Built-in ODE solvers, all from torchdiffeq (Chen et al. 2018, "Neural Ordinary Differential
Equations"; https://github.com/rtqichen/torchdiffeq)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint

from fmkit import Solver, Velocity, hookimpl


class FixedStepSolver(Solver):
    """A torchdiffeq fixed-grid method on `steps` steps.

    Args:
        method: torchdiffeq method name ("euler", "midpoint", "heun2", "rk4", ...).
        steps: number of steps from t0 to t1.
        grid_power: p in t_i = t0 + (t1 - t0) * (1 - (1 - i / steps) ** p); 1 is a uniform
            grid, p > 1 puts shorter steps near the data end (t = 1), where images gain detail.
    """

    adaptive = False

    def __init__(self, method: str, steps: int, grid_power: float = 1.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if grid_power <= 0:
            raise ValueError(f"grid_power must be positive, got {grid_power}")
        self.method = method
        self.steps = steps
        self.grid_power = grid_power

    def solve(self, velocity: Velocity, x0: Tensor, times: Tensor) -> Tensor:
        grid = self.grid(float(times[0]), float(times[-1])).to(times.device, times.dtype)
        # The grid is fixed by `steps`; `times` only chooses which states are returned, so a
        # trajectory request does not change the result.
        options = {"grid_constructor": lambda func, y0, t: grid}
        return odeint(velocity, x0, times, method=self.method, options=options)

    def grid(self, t0: float, t1: float) -> Tensor:
        """The steps' end points, (steps + 1,) from t0 to t1 (float64).

        The grid is built on the ascending interval and reversed when time runs backwards
        (the likelihood integrates 1 -> 0), so grid_power > 1 is dense near the data end in
        both directions.
        """
        lo, hi = min(t0, t1), max(t0, t1)
        u = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64)
        grid = lo + (hi - lo) * (1 - (1 - u) ** self.grid_power)
        return grid if t0 <= t1 else grid.flip(0)


class AdaptiveSolver(Solver):
    """A torchdiffeq adaptive-step method with error control.

    Args:
        method: torchdiffeq method name ("dopri5", "dopri8", "bosh3", "adaptive_heun").
        rtol, atol: relative and absolute error tolerances.
    """

    adaptive = True

    def __init__(self, method: str, rtol: float, atol: float) -> None:
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
        self.method = method
        self.rtol = rtol
        self.atol = atol

    def solve(self, velocity: Velocity, x0: Tensor, times: Tensor) -> Tensor:
        lo, hi = times.min(), times.max()

        def inside(t: Tensor, x: Tensor) -> Tensor:
            # Only the initial step-size probe can land outside: it evaluates at t0 + h0 for a
            # heuristic h0. Every real step stops at the requested times (step_t below).
            return velocity(t.clamp(lo, hi), x)

        # step_t makes every step end exactly on the requested times instead of overshooting
        # the last one and interpolating back: a flow model is never asked about t > 1 (or
        # t < 0 when integrating backwards), times it was never trained on.
        options = {"step_t": times}
        return odeint(
            inside, x0, times, method=self.method, rtol=self.rtol, atol=self.atol, options=options
        )


def _fixed(method: str, doc: str):
    def factory(*, steps: int = 100, grid_power: float = 1.0) -> FixedStepSolver:
        return FixedStepSolver(method, steps, grid_power)

    factory.__doc__ = doc
    factory.__name__ = factory.__qualname__ = method
    return factory


def _adaptive(method: str, doc: str):
    # 1e-5 is accurate enough for images in [-1, 1]; torchdiffeq's 1e-7/1e-9 waste NFE.
    def factory(*, rtol: float = 1e-5, atol: float = 1e-5) -> AdaptiveSolver:
        return AdaptiveSolver(method, rtol, atol)

    factory.__doc__ = doc
    factory.__name__ = factory.__qualname__ = method
    return factory


SOLVERS = {
    "euler": _fixed("euler", "Euler, first order, 1 NFE per step; options steps, grid_power."),
    "midpoint": _fixed(
        "midpoint", "Explicit midpoint, second order, 2 NFE per step; options steps, grid_power."
    ),
    "heun": _fixed(
        "heun2", "Heun's method, second order, 2 NFE per step; options steps, grid_power."
    ),
    "rk4": _fixed(
        "rk4", "Runge-Kutta 4 (3/8 rule), fourth order, 4 NFE per step; options steps, grid_power."
    ),
    "dopri5": _adaptive("dopri5", "Dormand-Prince 5(4), adaptive; options rtol, atol."),
    "dopri8": _adaptive("dopri8", "Dormand-Prince 8(5,3), adaptive; options rtol, atol."),
    "bosh3": _adaptive("bosh3", "Bogacki-Shampine 3(2), adaptive; options rtol, atol."),
    "adaptive_heun": _adaptive("adaptive_heun", "Heun-Euler 2(1), adaptive; options rtol, atol."),
}


@hookimpl
def register_solvers(register):
    for name, factory in SOLVERS.items():
        register(name, factory)
