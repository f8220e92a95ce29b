"""Flow matching: the training loss and sampling, for any backbone, path and solver."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmkit.path import ProbabilityPath
from fmkit.solver import Solution, Solver, build_solver, integrate

TIME_SAMPLING = ("uniform", "logit_normal", "edm")

# Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") draw
# training noise levels as ln(sigma) ~ N(P_mean, P_std^2). On the linear path the noise-to-data
# ratio is sigma = (1 - t) / t, so t = sigmoid(-ln sigma): a logit-normal skewed to the data end.
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


def sample_time(
    batch: int,
    method: str = "uniform",
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times t in (0, 1), shape (batch,).

    Args:
        method: "uniform"; "logit_normal" (Esser et al. 2024, "Scaling Rectified Flow
            Transformers"): t = sigmoid(loc + scale * n), n ~ N(0, 1), which spends more of
            the training signal on intermediate times; or "edm" (Karras et al. 2022): EDM's
            log-normal noise levels mapped to t, skewed towards the data end.
        loc, scale: the logit-normal location and scale (not used by the others).
    """
    if method == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if method == "logit_normal":
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(loc + scale * n)
    if method == "edm":
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(-(EDM_P_MEAN + EDM_P_STD * n))
    raise ValueError(f"unknown time sampling {method!r}; available: {', '.join(TIME_SAMPLING)}")


class FlowMatching:
    """Flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling").

    Trains `model(x, t)` to regress the conditional velocity of a probability path and samples
    by integrating the learned velocity from noise (t = 0) to data (t = 1) with an ODE solver.

    Args:
        model: backbone called as model(x, t), x (B, C, H, W), t (B,) -> (B, C, H, W).
        path: a ProbabilityPath, or the name of a registered path (default "linear").
        device: where to put the model; None keeps it where it is.
        time_sampling: "uniform", "logit_normal" or "edm" training times (see `sample_time`).
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
        if isinstance(path, str):
            from fmkit.plugins import registry

            path = registry("paths").build(path)
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(
                f"unknown time sampling {time_sampling!r}; available: {', '.join(TIME_SAMPLING)}"
            )
        self.model = model.to(device) if device is not None else model
        self.path = path
        self.time_sampling = time_sampling
        self.logit_normal_loc = logit_normal_loc
        self.logit_normal_scale = logit_normal_scale

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
            t: (B,) times; drawn by `time_sampling` when None.
        """
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        if t is None:
            t = sample_time(
                x1.shape[0],
                self.time_sampling,
                loc=self.logit_normal_loc,
                scale=self.logit_normal_scale,
                generator=generator,
                device=x1.device,
            )
        target = self.path.sample(noise, x1, t)
        predicted = self.model(target.x_t, target.t)  # (B, C, H, W)
        return torch.mean((predicted.float() - target.velocity.float()) ** 2)

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        """The learned velocity field as an ODE right-hand side: t 0-dim, x (B, C, H, W)."""
        return self.model(x, t.to(x.dtype).expand(x.shape[0]))

    @torch.no_grad()
    def generate(self, noise: Tensor, solver: Solver, times: Tensor | None = None) -> Solution:
        """Integrate from `noise` at t = 0 to t = 1.

        Args:
            noise: (B, C, H, W) starting points.
            solver: a Solver (see `fmkit.solver.build_solver`).
            times: (K,) times to return states at; default [0, 1].
        """
        if times is None:
            times = torch.tensor([0.0, 1.0])
        return integrate(solver, self.velocity, noise, times.to(noise.device, noise.dtype))

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
