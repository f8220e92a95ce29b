"""The seed's `FlowMatching` API, on top of the `flow_matching` objective."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmkit.objective import as_model
from fmkit.path import ProbabilityPath
from fmkit.solver import Solution, Solver, build_solver


class FlowMatching:
    """Flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"): the seed's
    API, kept working on top of the `flow_matching` objective.

    Trains `model(x, t)` to regress the conditional velocity of a probability path and samples
    by integrating the learned velocity from noise (t = 0) to data (t = 1) with an ODE solver.

    Args:
        model: backbone called as model(x, t), x (B, C, H, W), t (B,) -> (B, C, H, W).
        path: a ProbabilityPath, or the name of a registered path (default "linear").
        device: where to put the model; None keeps it where it is.
        time_sampling: "uniform", "logit_normal" or "edm" training times (see
            `fmkit.sample_time`).
        logit_normal_loc, logit_normal_scale: parameters of the logit-normal time sampling.
    """

    def __init__(
        self,
        model: nn.Module,
        path: ProbabilityPath | str = "linear",
        device: torch.device | str | None = None,
        time_sampling: str = "uniform",
        logit_normal_loc: float = 0.0,
        logit_normal_scale: float = 1.0,
    ) -> None:
        from fmkit.plugins import registry

        if isinstance(path, str):
            path = registry("paths").build(path)
        self.model = model.to(device) if device is not None else model
        self.path = path
        options = {
            "time_sampling": time_sampling,
            "time_loc": logit_normal_loc,
            "time_scale": logit_normal_scale,
        }
        self.objective = registry("objectives").build("flow_matching", options, path=path)

    @property
    def device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def loss(
        self,
        x1: Tensor,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Mean squared error between predicted and target velocity (a scalar).

        Args:
            x1: (B, C, H, W) data in [-1, 1].
            noise: (B, C, H, W) x0; drawn from N(0, I) when None.
            t: (B,) times; drawn by the time sampling when None.
        """
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        if t is None:
            t = self.objective.times.sample(x1.shape[0], generator, x1.device)
        return self.objective.regress(as_model(self.model), noise, x1, t, None)

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        """The learned velocity field as an ODE right-hand side: t 0-dim, x (B, C, H, W)."""
        return self.objective.velocity(as_model(self.model))(t, x)

    @torch.no_grad()
    def generate(self, noise: Tensor, solver: Solver, times: Tensor | None = None) -> Solution:
        """Integrate from `noise` (B, C, H, W) at t = 0 to t = 1 with `solver`; the states at
        `times` (default [0, 1]) are returned too."""
        return self.objective.generate(as_model(self.model), noise, solver, times=times)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 64,
        num_steps: int = 100,
        image_size: tuple[int, int] = (64, 64),
        channels: int = 3,
        solver: str = "euler",
        generator: torch.Generator | None = None,
        **solver_options,
    ) -> Tensor:
        """Generate `num_samples` images, (N, C, H, W) roughly in [-1, 1].

        Args:
            num_steps: steps of a fixed-step solver (adaptive solvers ignore it).
            solver: name of a registered solver.
            solver_options: passed to the solver's factory (e.g. rtol=1e-5).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            # Draw on the generator's device so a CPU seed gives the same noise everywhere.
            noise = torch.randn(
                num_samples,
                channels,
                *image_size,
                generator=generator,
                device=generator.device if generator is not None else self.device,
            ).to(self.device)
            built = build_solver(solver, steps=num_steps, options=solver_options)
            return self.generate(noise, built).x
        finally:
            self.model.train(was_training)
