"""Flow-map distillation (`--objective distill`): on a Gaussian data distribution, whose flow
map along the linear path is known in closed form, the objective's targets are the true
average velocity and a perfect student lands on the exact solution; through the CLI a student
trains from a teacher run, samples in a few jumps, resumes exactly and leaves its teacher as
it was."""

import math

import pytest
import torch
from conftest import one_line_error, train_args

from fmkit import DataSpec, Generator, registry
from fmkit.batch import Batch
from fmkit.objective import Draws, as_model
from fmkit.spec import ModelSpec
from fmkit.teacher import Teacher

MU, S = 0.5, 0.3  # data N(MU, S^2) per pixel; noise N(0, 1); x_t = t x_data + (1 - t) x_noise


def sigma(t):
    return torch.sqrt((1 - t) ** 2 + t**2 * S**2)


def flow_map(x, t, r):
    """X_{t,r}(x): where the ODE from x at time t is at time r (the marginals are Gaussian)."""
    t, r = (v.view(-1, 1, 1, 1).to(x) for v in (t, r))
    return r * MU + sigma(r) / sigma(t) * (x - t * MU)


class Velocity(torch.nn.Module):
    """The exact marginal velocity v(x, t) (the teacher a perfect flow-matching run gives)."""

    def forward(self, x, t):
        t = t.view(-1, 1, 1, 1).to(x)
        return MU + (t * S**2 - (1 - t)) / sigma(t) ** 2 * (x - t * MU)


class AverageVelocity(torch.nn.Module):
    """The exact average velocity u(x, t, r) = (X_{t,r}(x) - x) / (r - t), u(x, t, t) = v."""

    def forward(self, x, t, cond):
        r = cond["r"]
        t4, r4 = (v.view(-1, 1, 1, 1).to(x) for v in (t, r))
        gap = r4 - t4
        safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        slope = torch.where(
            gap == 0, (t4 * S**2 - (1 - t4)) / sigma(t4), (sigma(r4) - sigma(t4)) / safe
        )
        return MU + slope / sigma(t4) * (x - t4 * MU)


def spec(objective="flow_matching", **opts):
    return ModelSpec(backbone="unet", backbone_opts={}, data=DataSpec(1, 4), objective=objective,
                     objective_opts=opts)  # fmt: skip


def objective(form, teacher=None):
    path = registry("paths").build("linear", {})
    teacher = teacher or Teacher(Generator(spec(), Velocity()))
    return registry("objectives").build("distill", {"form": form}, path=path, teacher=teacher)


@pytest.mark.parametrize("form", ["lagrangian", "eulerian"])
def test_the_target_of_the_exact_flow_map_is_itself(form):
    gen = torch.Generator().manual_seed(0)
    x = MU * torch.rand(64, 1, 1, 1, generator=gen) + torch.randn(64, 1, 4, 4, generator=gen)
    a, b = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    t, r = torch.minimum(a, b), torch.maximum(a, b)
    u, target = objective(form).target(as_model(AverageVelocity()), x, t, r, None)
    exact = (flow_map(x, t, r) - x) / (r - t).view(-1, 1, 1, 1)
    torch.testing.assert_close(u, exact, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(target, exact, rtol=1e-4, atol=1e-4)  # the true average velocity
    # A wrong student gets a target that differs from its own output.
    wrong = lambda x, t, cond: AverageVelocity()(x, t, cond) + 0.1 * x  # noqa: E731
    u, target = objective(form).target(wrong, x, t, r, None)
    assert (u - target).abs().mean() > 1e-2


@pytest.mark.parametrize("jumps", [1, 2, 4])
def test_a_perfect_student_lands_on_the_exact_solution(jumps):
    student = Generator(spec("distill", jumps=jumps), AverageVelocity())
    assert student.defaults.steps == jumps and student.defaults.guidance == 1.0
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    solution = student.generate(noise, student.defaults.solver_for().solver)
    assert solution.nfe == jumps
    exact = MU + S * noise  # X_{0,1}: sigma(0) = 1, sigma(1) = S
    torch.testing.assert_close(solution.x, exact, rtol=1e-5, atol=1e-5)


def test_the_teacher_gets_no_gradient_and_the_student_does():
    teacher_module = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    teacher = Teacher(Generator(spec(), _TimeFree(teacher_module)))
    before = [p.detach().clone() for p in teacher_module.parameters()]
    student = _Student()
    loss = objective("lagrangian", teacher).loss(
        as_model(student), Batch(torch.randn(4, 1, 4, 4)), Draws(0, 0, 4, slice(0, 4))
    )
    loss.value.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher_module.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher_module.parameters(), strict=True))
    assert not teacher.generator().module.training  # eval mode


class _TimeFree(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x) * t.view(-1, 1, 1, 1)


class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x, t, cond):
        return self.net(x) * (1 + cond["r"] - t).view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from click.testing import CliRunner
    from conftest import small_faces

    from fmkit.cli import cli

    root = tmp_path_factory.mktemp("distill")
    faces = small_faces(root / "faces")
    run = root / "teacher"
    result = CliRunner().invoke(cli, [str(a) for a in train_args(faces, run, "--max-steps", 3)])
    assert result.exit_code == 0, result.output
    return {"faces": faces, "run": run}


def test_a_student_trains_from_its_teacher_samples_in_jumps_and_resumes_exactly(
    teacher_run, tmp_path, run_cli
):
    faces, teacher = teacher_run["faces"], teacher_run["run"]
    files = {p: p.read_bytes() for p in teacher.rglob("*") if p.is_file()}
    distill = ["--objective", "distill", "--init-from", teacher, "--objective-opt", "jumps=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    result = run_cli(*train_args(faces, full, "--max-steps", 4, *distill))
    assert result.exit_code == 0, result.output
    assert "distill on the linear path" in result.output
    assert run_cli(*train_args(faces, split, "--max-steps", 2, *distill)).exit_code == 0
    assert run_cli(*train_args(faces, split, "--max-steps", 4, "--resume")).exit_code == 0
    from fmkit import checkpoint

    a, _ = checkpoint.load(full / "checkpoint_final.safetensors")
    b, _ = checkpoint.load(split / "checkpoint_final.safetensors")
    for key in a:
        if key.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[key], b[key]), key
    # The teacher's files are as they were.
    assert {p: p.read_bytes() for p in teacher.rglob("*") if p.is_file()} == files

    student = Generator.load(full)
    assert student.spec.backbone_opts["two_times"] is True
    assert student.defaults.steps == 2  # its default saved with it
    out = tmp_path / "samples"
    result = run_cli("sample", "--checkpoint", full, "--num-samples", 2, "--output", out)
    assert result.exit_code == 0 and "euler:2:schedule=uniform, mean NFE 2.0" in result.output
    one = run_cli("sample", "--checkpoint", full, "--num-samples", 2, "--output", tmp_path / "1",
                  "--steps", 1)  # fmt: skip
    assert one.exit_code == 0 and "mean NFE 1.0" in one.output

    line = one_line_error(run_cli(*train_args(faces, tmp_path / "x", "--objective", "distill")))
    assert "--init-from" in line and not (tmp_path / "x").exists()


def test_a_guided_teacher_is_folded_into_one_evaluation_per_jump():
    """A class-conditional teacher: the student's target uses the guided velocity
    v_u + w (v_c - v_u) inside the guidance interval, and v_c outside it."""
    from fmkit.batch import Condition

    class Conditional(torch.nn.Module):
        def forward(self, x, t, cond):
            label = cond["class"].view(-1, 1, 1, 1).to(x)
            return x * 0 + torch.where(label < 0, torch.zeros_like(label), 1 + label)

    data = DataSpec(1, 4, Condition("class", ("a", "b")))
    generator = Generator(ModelSpec("unet", {}, data), Conditional())
    teacher = Teacher(generator, guidance=3.0, interval=(0.2, 0.8))
    x = torch.zeros(3, 1, 4, 4)
    cond = {"class": torch.tensor([1, 1, -1])}  # b, b, unspecified
    v = teacher.velocity(x, torch.tensor([0.5, 0.9, 0.5]), cond)
    # inside: 0 + 3 (2 - 0) = 6; outside the interval: v_c = 2; unspecified: v_u = 0.
    assert v[:, 0, 0, 0].tolist() == [6.0, 2.0, 0.0]
    assert math.isclose(teacher.guidance, 3.0)
