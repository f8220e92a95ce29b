"""MeanFlow: the objective's target against a flow whose average velocity is known in closed
form, and one- and few-step training and sampling through the CLI."""

import math

import pytest
import torch
from conftest import TINY, one_line_error, train_args

from fmkit import Generator, registry

MU, SIGMA = 0.5, 0.3  # data: every pixel ~ N(MU, SIGMA^2); noise N(0, 1)


def scale(t):  # the marginal at t is N(t MU, s(t)^2) on the linear path
    return torch.sqrt((1 - t) ** 2 + (t * SIGMA) ** 2)


def flow(x, t, r):  # where the ODE takes x from time t to time r
    return r * MU + scale(r) / scale(t) * (x - t * MU)


def exact_average(x, t, r, cond=None):
    """u(x, t, r) = (x_r - x_t) / (r - t), and the velocity itself where r = t."""
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    ds = ((1 - t4) * -1 + t4 * SIGMA**2) / scale(t4)  # s'(t)
    velocity = MU + ds / scale(t4) * (x - t4 * MU)
    gap = r4 - t4
    safe = torch.where(gap == 0, torch.ones_like(gap), gap)
    return torch.where(gap == 0, velocity, (flow(x, t4, r4) - x) / safe)


def marginal_pair(x_t, t):
    """(x0, x1) on the straight line through x_t whose velocity x1 - x0 is the marginal one,
    so the conditional target equals its expectation and the exact u scores zero."""
    v = exact_average(x_t, t, t)
    t4 = t.view(-1, 1, 1, 1)
    return x_t - t4 * v, x_t + (1 - t4) * v


def objective():
    path = registry("paths").build("linear", {})
    return registry("objectives").build("meanflow", {}, path=path)


def test_the_exact_average_velocity_meets_the_meanflow_target():
    torch.manual_seed(0)
    x_t = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9
    r = t + (1 - t) * torch.rand(64, dtype=torch.float64)
    x0, x1 = marginal_pair(x_t, t)

    def model(x, time, cond):
        return exact_average(x, time, cond["r"])

    error = objective().error(model, x0, x1, t, r, None)
    assert error.max() < 1e-20

    # The instantaneous velocity (u ignoring r) is not the average velocity: the target says so.
    def instantaneous(x, time, cond):
        return exact_average(x, time, time)

    assert objective().error(instantaneous, x0, x1, t, r, None).mean() > 1e-3
    # The sampler's jumps with the exact u land on the ODE's solution in any number of steps.
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    exact = flow(
        noise, torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    for steps in (1, 2, 4):
        solver = registry("solvers").build("euler", {"steps": steps})
        out = objective().generate(model, noise, solver)
        assert out.nfe == steps
        torch.testing.assert_close(out.x, exact, rtol=0, atol=1e-12)


def test_meanflow_trains_and_samples_in_one_two_and_four_steps(faces, tmp_path, run_cli):
    out = tmp_path / "mf"
    args = train_args(faces, out, "--objective", "meanflow", "--backbone-opt", "two_times=true")
    result = run_cli(*args, "--max-steps", 6, "--sample-steps", 1)
    assert result.exit_code == 0, result.output
    for steps in (1, 2, 4):
        result = run_cli("sample", "--checkpoint", out, "--steps", steps, "--num-samples", 2,
                         "--output", tmp_path / f"s{steps}")  # fmt: skip
        assert result.exit_code == 0 and f"mean NFE {steps}.0" in result.output, result.output
    samples = Generator.load(out).sample(2, steps=1)
    assert samples.images.shape == (2, 3, 16, 16) and torch.isfinite(samples.images).all()
    assert math.isfinite(float(samples.images.mean()))


def test_meanflow_trains_as_written_and_turns_on_the_second_time(faces, tmp_path, run_cli):
    """The objective says what it needs (`backbone_needs`), so `--objective meanflow` works
    without --backbone-opt two_times=true, and the model records it."""
    result = run_cli(*train_args(faces, tmp_path / "x", "--objective", "meanflow",
                                 "--max-steps", 1))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Generator.load(tmp_path / "x").spec.backbone_opts["two_times"] is True


def test_meanflow_refuses_two_times_false_before_writing(faces, tmp_path, run_cli):
    """Defect 4 of the safety issue: the refusal came after config.json and metrics.jsonl."""
    line = one_line_error(run_cli(*train_args(faces, tmp_path / "x", "--objective", "meanflow",
                                              "--backbone-opt", "two_times=false",
                                              "--max-steps", 1)))  # fmt: skip
    assert "two_times=true" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("opt", ["equal_fraction=1.5", "adaptive_p=-1"])
def test_bad_meanflow_options_are_one_line(faces, tmp_path, run_cli, opt):
    args = train_args(faces, tmp_path / "x", "--objective", "meanflow", "--objective-opt", opt)
    assert "meanflow" in one_line_error(run_cli(*args, *TINY[:0], "--max-steps", 1))


def test_a_meanflow_student_starts_from_a_flow_matching_teacher(faces, tmp_path, run_cli):
    """`--init-from` a flow-matching teacher: the student's second-time path is new (and starts
    at zero), everything else is the teacher's, so at the start it is the teacher's velocity."""
    teacher = tmp_path / "teacher"
    assert run_cli(*train_args(faces, teacher, "--max-steps", 2)).exit_code == 0
    student = tmp_path / "student"
    result = run_cli(*train_args(faces, student, "--objective", "meanflow", "--init-from",
                                 teacher, "--max-steps", 1, "--lr", 1e-12))  # fmt: skip
    assert result.exit_code == 0, result.output
    a, b = Generator.load(teacher), Generator.load(student)
    assert b.spec.backbone_opts["two_times"] is True and "two_times" not in a.spec.backbone_opts
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        expected = a.module(x, t)
        for r in (t, torch.ones(3)):  # the average velocity over any interval, at the start
            torch.testing.assert_close(b.module(x, t, {"r": r}), expected, atol=1e-5, rtol=1e-4)
