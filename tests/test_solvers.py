"""Every registered solver against ODEs whose solutions are known in closed form."""

import math

import pytest
import torch

from fmkit import build_solver, integrate, registry
from fmkit.errors import FmkitError

SOLVERS = registry("solvers").names()
FIXED_NFE_PER_STEP = {"euler": 1, "ab2": 1, "midpoint": 2, "heun": 2, "rk4": 4}
SCHEDULES = ["uniform", "power", "shift", "edm"]


def decay(t, x):  # dx/dt = -x  ->  x(t) = x0 exp(-t)
    return -x


def time_dependent(t, x):  # dx/dt = cos(2 pi t) x  ->  x(t) = x0 exp(sin(2 pi t) / (2 pi))
    return torch.cos(2 * math.pi * t) * x


CASES = [
    (decay, lambda x0, t: x0 * math.exp(-t)),
    (time_dependent, lambda x0, t: x0 * math.exp(math.sin(2 * math.pi * t) / (2 * math.pi))),
]


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("field, exact", CASES)
def test_solver_matches_closed_form(name, field, exact):
    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    solver = build_solver(name, steps=200)
    if solver.adaptive:
        solver = build_solver(name, options={"rtol": 1e-8, "atol": 1e-8})
    times = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    sol = integrate(solver, field, x0, times)
    assert sol.trajectory.shape == (3, 2, 3, 4, 4)
    for k, t in enumerate(times.tolist()):
        # Euler is first order (error ~ 1e-3 here at 200 steps); the others are far tighter
        # (ab2's default shift schedule takes 3x longer steps near t = 1: ~1e-4).
        atol = {"euler": 1e-2, "ab2": 5e-4}.get(name, 1e-4)
        torch.testing.assert_close(sol.trajectory[k], exact(x0, t), rtol=0, atol=atol)
    assert sol.nfe > 0


@pytest.mark.parametrize("name, per_step", sorted(FIXED_NFE_PER_STEP.items()))
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_fixed_step_nfe_is_exact(name, per_step, steps):
    sol = integrate(
        build_solver(name, steps=steps), decay, torch.ones(1, 1, 2, 2), torch.tensor([0.0, 1.0])
    )
    assert sol.nfe == per_step * steps
    assert not build_solver(name, steps=steps).adaptive


def test_every_fixed_step_solver_is_known_here():
    fixed = [n for n in SOLVERS if not build_solver(n, steps=3).adaptive]
    assert sorted(fixed) == sorted(FIXED_NFE_PER_STEP)


def growing_decay(t, x):  # dx/dt = -(1 + t) x  ->  x(1) = x0 exp(-1.5)
    return -(1 + t) * x


ORDER = {"euler": 1, "ab2": 2, "midpoint": 2, "heun": 2, "rk4": 4}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", sorted(ORDER))
def test_order_of_accuracy_on_every_schedule(name, schedule):
    # Halving the steps divides the global error by about 2 ** order, whatever the schedule.
    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    options = {"schedule": schedule}
    errors = [
        (integrate(build_solver(name, steps=n, options=options), growing_decay, x0, t).x)
        .sub(math.exp(-1.5))
        .abs()
        .item()
        for n in (200, 400)
    ]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(ORDER[name], abs=0.25)


def test_schedules_lay_out_the_published_grids():
    def grid(**options):
        return build_solver("heun", steps=4, options=options).grid(0.0, 1.0).tolist()

    assert grid() == pytest.approx([0, 0.25, 0.5, 0.75, 1])  # the RK methods' default
    assert grid(schedule="power", power=2.0) == pytest.approx([0, 0.4375, 0.75, 0.9375, 1])
    # SD3's shift on the noise level sigma = 1 - t: sigma' = 3 sigma / (1 + 2 sigma).
    assert grid(schedule="shift", shift=3.0) == pytest.approx([0, 0.1, 0.25, 0.5, 1])
    # EDM's rho-schedule on sigma = (1 - t) / t, stretched to end at 0 and 1.
    edm = grid(schedule="edm", rho=7.0)
    sigma = [(80 ** (1 / 7) + u * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for u in (0, 0.5, 1)]
    t = [1 / (1 + s) for s in sigma]
    assert edm[2] == pytest.approx((t[1] - t[0]) / (t[2] - t[0]))
    assert edm[0] == 0 and edm[-1] == 1 and edm == sorted(edm)


def test_ab2_spends_one_evaluation_per_step_and_reuses_the_last():
    seen = []

    def record(t, x):
        seen.append(float(t))
        return -x

    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    solver = build_solver("ab2", steps=3, options={"schedule": "uniform"})
    sol = integrate(solver, record, x0, torch.tensor([0.0, 1.0]))
    assert seen == pytest.approx([0, 1 / 3, 2 / 3])
    # By hand: an Euler step, then two uniform Adams-Bashforth 2 steps.
    h, x1 = 1 / 3, 1 - 1 / 3
    x2 = x1 + h * (1.5 * -x1 - 0.5 * -1.0)
    x3 = x2 + h * (1.5 * -x2 - 0.5 * -x1)
    assert sol.x.item() == pytest.approx(x3)


def test_adaptive_tolerance_trades_nfe_for_accuracy():
    x0 = torch.ones(4, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loose = integrate(
        build_solver("dopri5", options={"rtol": 1e-3, "atol": 1e-3}), time_dependent, x0, t
    )
    tight = integrate(
        build_solver("dopri5", options={"rtol": 1e-9, "atol": 1e-9}), time_dependent, x0, t
    )
    assert tight.nfe > loose.nfe
    exact = math.exp(0.0)
    assert (tight.x - exact).abs().max() < (loose.x - exact).abs().max() + 1e-12
    assert build_solver("dopri5").adaptive


def test_adaptive_solvers_ignore_steps():
    solver = build_solver("dopri5", steps=5)
    assert solver.adaptive and not hasattr(solver, "steps")


def test_power_schedule_moves_steps_to_the_data_end_without_changing_nfe():
    seen = []

    def record(t, x):
        seen.append(float(t))
        return torch.zeros_like(x)

    x0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = integrate(
        build_solver("euler", steps=4, options={"schedule": "power", "power": 2.0}), record, x0, t
    )
    assert sol.nfe == 4
    assert seen == pytest.approx([0.0, 1 - 0.75**2, 1 - 0.5**2, 1 - 0.25**2])
    # Still converges to the closed form.
    fine = integrate(
        build_solver("rk4", steps=50, options={"schedule": "power", "power": 3.0}), decay, x0 + 1, t
    )
    assert abs(fine.x.item() - math.exp(-1)) < 1e-6


def slow(t, x):  # a nearly still field: the step-size heuristic then proposes a huge first step
    return 1e-4 * x


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("field", [decay, time_dependent, slow])
@pytest.mark.parametrize("times", [[0.0, 1.0], [1.0, 0.0], [0.0, 0.3, 1.0]])
def test_solvers_never_evaluate_outside_the_requested_times(name, field, times):
    seen = []

    def record(t, x):
        seen.append(float(t))
        return field(t, x)

    times = torch.tensor(times, dtype=torch.float64)
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 1, 2, 2)
    integrate(build_solver(name, steps=10), record, x0, times)
    lo, hi = times.min().item(), times.max().item()
    assert seen and min(seen) >= lo and max(seen) <= hi, (min(seen), max(seen))


def test_schedules_are_dense_at_the_same_end_when_time_runs_backwards():
    seen = []

    def record(t, x):
        seen.append(float(t))
        return torch.zeros_like(x)

    x0 = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    integrate(
        build_solver("euler", steps=4, options={"schedule": "power", "power": 2.0}), record, x0, t
    )
    # The forward grid 0, 0.4375, 0.75, 0.9375, 1 walked from 1 down to 0.
    assert seen == pytest.approx([1.0, 1 - 0.25**2, 1 - 0.5**2, 1 - 0.75**2])


def test_one_evaluation_methods_default_to_the_shift_schedule():
    # Measured best for them on the quality benchmark; Heun and the other RK methods are not.
    for name in ("euler", "ab2"):
        grid = build_solver(name, steps=4).grid(0.0, 1.0).tolist()
        assert grid == pytest.approx([0, 0.1, 0.25, 0.5, 1])


def test_an_unknown_schedule_is_a_clear_error():
    with pytest.raises(FmkitError, match="unknown schedule 'cosine'; choose from uniform"):
        build_solver("euler", steps=4, options={"schedule": "cosine"})


# The safety issue's defect 5: the default solver returned black (NaN, cast to 0) images on
# dense power schedules, whose float32 neighbours near t = 1 coincide (ab2's step ratio was
# 0 / 0), and extreme schedule parameters gave non-finite grids unchecked.
# (schedule, parameters, steps, accuracy expected of the final state; None: too few steps
# where they matter for any accuracy, but still never NaN)
DENSE = [
    ("power", {"power": 4.0}, 100, 0.05),
    ("power", {"power": 10.0}, 20, None),
    ("power", {"power": 3.0}, 500, 0.05),
    ("shift", {"shift": 1e-4}, 50, None),
    ("shift", {"shift": 1e4}, 50, None),
    ("edm", {"rho": 30.0}, 100, 0.05),
]


@pytest.mark.parametrize("name", sorted(FIXED_NFE_PER_STEP))
@pytest.mark.parametrize("schedule, params, steps, atol", DENSE)
def test_no_solver_returns_nan_on_dense_schedules(name, schedule, params, steps, atol):
    solver = build_solver(name, steps=steps, options={"schedule": schedule, **params})
    x0 = torch.randn(2, 3, 4, 4)  # float32, as images are sampled
    for times in (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.linspace(0, 1, 5)):
        solution = integrate(solver, time_dependent, x0, times)
        assert torch.isfinite(solution.trajectory).all(), (name, schedule, params, times)
    if atol is not None:  # and it still solves the ODE: the final state is the closed form's
        exact = CASES[1][1](x0.double(), 1.0).float()
        final = integrate(solver, time_dependent, x0, torch.tensor([0.0, 1.0])).x
        torch.testing.assert_close(final, exact, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"schedule": "shift", "shift": float("inf")}, "shift must be a positive finite number"),
        ({"schedule": "edm", "rho": float("inf")}, "rho must be a positive finite number"),
        ({"schedule": "power", "power": float("nan")}, "power must be a positive finite number"),
        ({"schedule": "shift", "shift": 1e-300}, "distinct finite steps"),
        ({"schedule": "power", "power": 1e6}, "distinct finite steps"),
    ],
)
def test_degenerate_grids_are_refused_when_the_solver_is_built(options, message):
    for name in sorted(FIXED_NFE_PER_STEP):
        with pytest.raises(FmkitError, match=message):
            build_solver(name, steps=20, options=options)
