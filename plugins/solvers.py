"""Built-in ODE solvers: torchdiffeq's fixed-grid and adaptive methods (Chen et al. 2018, "Neural
Ordinary Differential Equations"; https://github.com/rtqichen/torchdiffeq), a two-step
Adams-Bashforth method, and the time-step schedules every fixed-grid solver takes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fmkit import Solver, Velocity, hookimpl

# A schedule maps the fraction u = i / steps of the steps taken to the fraction s of the
# interval covered, both in [0, 1], s(0) = 0 and s(1) = 1, walking from noise (s = 0) to
# data (s = 1); grids are built on the ascending interval and reversed when time runs
# backwards (the likelihood integrates 1 -> 0), so each schedule is dense at the same end of
# the data in both directions.
SCHEDULES = ("uniform", "power", "shift", "edm")
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0  # Karras et al. 2022, Table 1


def schedule_fraction(
    name: str, u: Tensor, power: float = 2.0, shift: float = 3.0, rho: float = 7.0
) -> Tensor:
    """s(u) for the schedule `name` (see SCHEDULES), u: (N,) float64 in [0, 1].

    - uniform: s = u.
    - power: s = 1 - (1 - u) ** power; power > 1 shortens the steps near the data end.
    - shift: the timestep shift of Esser et al. 2024 ("Scaling Rectified Flow Transformers",
      SD3), applied to the noise level sigma = 1 - s of a uniform grid:
      sigma' = shift * sigma / (1 + (shift - 1) * sigma); shift > 1 spends more steps at high
      noise, shift < 1 near the data.
    - edm: the rho-schedule of Karras et al. 2022 ("Elucidating the Design Space of
      Diffusion-Based Generative Models", eq. 5) on the linear path's noise-to-signal ratio
      sigma = (1 - t) / t, from sigma_max = 80 to sigma_min = 0.002, mapped to t = 1 / (1 + sigma)
      and stretched affinely so the grid starts at pure noise and ends at the data.
    """
    if name == "uniform":
        return u
    if name == "power":
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        return 1 - (1 - u) ** power
    if name == "shift":
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        sigma = 1 - u
        return 1 - shift * sigma / (1 + (shift - 1) * sigma)
    if name == "edm":
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}")
        hi, lo = EDM_SIGMA_MAX ** (1 / rho), EDM_SIGMA_MIN ** (1 / rho)
        t = 1 / (1 + (hi + u * (lo - hi)) ** rho)
        return (t - t[0]) / (t[-1] - t[0])
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


class GridSolver(Solver):
    """A solver on a fixed grid of `steps` steps laid out by a schedule.

    Args:
        steps: number of steps from t0 to t1.
        schedule: one of SCHEDULES (see `schedule_fraction`), with its parameter `power`,
            `shift` or `rho`.
    """

    adaptive = False

    def __init__(
        self,
        steps: int,
        schedule: str = "uniform",
        power: float = 2.0,
        shift: float = 3.0,
        rho: float = 7.0,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        for key, value in (("power", power), ("shift", shift), ("rho", rho)):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a positive finite number, got {value}")
        self.steps = steps
        self.schedule = dict(name=schedule, power=power, shift=shift, rho=rho)
        # A bad schedule fails here, not mid-sampling: grid points that are not finite or that
        # coincide even in float64 (power=1e6 puts all but the first at t = 1) make no steps.
        grid = self.grid(0.0, 1.0)
        if not bool(torch.isfinite(grid).all()) or bool((grid.diff() <= 0).any()):
            key = {"power": "power", "shift": "shift", "edm": "rho"}.get(schedule)
            given = f" with {key}={self.schedule[key]:g}" if key else ""
            raise ValueError(
                f"the {schedule} schedule{given} gives no {steps} distinct finite steps; "
                "choose a milder value or fewer steps"
            )

    def grid(self, t0: float, t1: float) -> Tensor:
        """The steps' end points, (steps + 1,) from t0 to t1 (float64)."""
        lo, hi = min(t0, t1), max(t0, t1)
        u = torch.linspace(0.0, 1.0, self.steps + 1, dtype=torch.float64)
        grid = lo + (hi - lo) * schedule_fraction(u=u, **self.schedule)
        grid[0], grid[-1] = lo, hi  # exactly: rounding in a schedule must not move the ends
        return grid if t0 <= t1 else grid.flip(0)


# Step sizes and ratios are taken from the float64 grid: near t = 1 a dense schedule (power=4
# at 100 steps) has neighbours that float32 cannot tell apart, and a ratio of their float32
# differences is 0 / 0. The model is still asked at float32 times.


class FixedStepSolver(GridSolver):
    """A torchdiffeq fixed-grid method (`method`: "euler", "midpoint", "heun2", "rk4", ...)."""

    def __init__(self, method: str, steps: int, **schedule) -> None:
        super().__init__(steps, **schedule)
        self.method = method

    def solve(self, velocity: Velocity, x0: Tensor, times: Tensor) -> Tensor:
        grid = self.grid(float(times[0]), float(times[-1])).to(times.device, times.dtype)
        # The grid is fixed by `steps`; `times` only chooses which states are returned, so a
        # trajectory request does not change the result.
        options = {"grid_constructor": lambda func, y0, t: grid}
        from torchdiffeq import odeint  # here: it imports scipy, a second on every start

        return odeint(velocity, x0, times, method=self.method, options=options)


class AdamsBashforth2(GridSolver):
    """The two-step Adams-Bashforth method for variable steps: second order at one evaluation
    per step, reusing the previous step's velocity (Hairer, Norsett & Wanner, "Solving Ordinary
    Differential Equations I", III.5). The first step is an Euler step.

    With h = t[n+1] - t[n] and r = h / (t[n] - t[n-1]):
        x[n+1] = x[n] + h * ((1 + r / 2) * v[n] - (r / 2) * v[n-1])
    States at requested times between grid points are interpolated linearly, as torchdiffeq's
    fixed-grid methods do.
    """

    def solve(self, velocity: Velocity, x0: Tensor, times: Tensor) -> Tensor:
        grid = self.grid(float(times[0]), float(times[-1]))  # (steps + 1,) float64, CPU
        at = grid.to(times.device, times.dtype)  # the times the model is asked at
        states, previous = [x0], None
        for n in range(self.steps):
            h = float(grid[n + 1] - grid[n])
            v = velocity(at[n], states[-1])
            if previous is None:
                step = v
            else:
                r = h / float(grid[n] - grid[n - 1])
                step = (1 + r / 2) * v - (r / 2) * previous
            states.append(states[-1] + h * step)
            previous = v
        return _at(times, grid, torch.stack(states))


def _at(times: Tensor, grid: Tensor, states: Tensor) -> Tensor:
    """(K, ...) states at `times`, linearly interpolated from (N + 1, ...) states on the
    float64 `grid` (strictly monotone, same direction as `times`)."""
    sign = 1.0 if grid[-1] >= grid[0] else -1.0
    ascending = grid * sign
    out = []
    for t in times.double().cpu() * sign:
        j = int(torch.searchsorted(ascending, t.reshape(1), right=True).clamp(1, len(grid) - 1))
        w = float(((t - ascending[j - 1]) / (ascending[j] - ascending[j - 1])).clamp(0, 1))
        out.append(states[j - 1] + w * (states[j] - states[j - 1]))
    return torch.stack(out)


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
        from torchdiffeq import odeint

        return odeint(
            inside, x0, times, method=self.method, rtol=self.rtol, atol=self.atol, options=options
        )


def _fixed(method: str, doc: str, cls=None, default_schedule: str = "uniform"):
    def factory(
        *,
        steps: int = DEFAULT_STEPS,
        schedule: str = default_schedule,
        power: float = 2.0,
        shift: float = 3.0,
        rho: float = 7.0,
    ) -> GridSolver:
        schedule_options = dict(schedule=schedule, power=power, shift=shift, rho=rho)
        if cls is not None:
            return cls(steps, **schedule_options)
        return FixedStepSolver(method, steps, **schedule_options)

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


# The steps of a fixed-step solver built without them: those a model samples with by default
# (flow matching's Sampling: ab2 with 20), so `fmkit show solvers` tells what commands do.
DEFAULT_STEPS = 20

GRID = "options steps, schedule (uniform, power, shift, edm), power, shift, rho"
SOLVERS = {
    # One-evaluation-per-step methods default to SD3's shift (3): it gave them lower Fréchet
    # distances than a uniform grid at 4 to 20 steps on the quality benchmark, while it made
    # Heun worse there (docs/benchmarks.md, "Without mirrored digits"); the others stay uniform.
    "euler": _fixed("euler", f"Euler, first order, 1 NFE per step; {GRID}.", None, "shift"),
    "ab2": _fixed(
        "ab2",
        f"Adams-Bashforth 2 multistep, second order, 1 NFE per step; {GRID}.",
        AdamsBashforth2,
        "shift",
    ),
    "midpoint": _fixed("midpoint", f"Explicit midpoint, second order, 2 NFE per step; {GRID}."),
    "heun": _fixed("heun2", f"Heun's method, second order, 2 NFE per step; {GRID}."),
    "rk4": _fixed("rk4", f"Runge-Kutta 4 (3/8 rule), fourth order, 4 NFE per step; {GRID}."),
    "dopri5": _adaptive("dopri5", "Dormand-Prince 5(4), adaptive; options rtol, atol."),
    "dopri8": _adaptive("dopri8", "Dormand-Prince 8(5,3), adaptive; options rtol, atol."),
    "bosh3": _adaptive("bosh3", "Bogacki-Shampine 3(2), adaptive; options rtol, atol."),
    "adaptive_heun": _adaptive("adaptive_heun", "Heun-Euler 2(1), adaptive; options rtol, atol."),
}


@hookimpl
def register_solvers(register):
    for name, factory in SOLVERS.items():
        register(name, factory)
