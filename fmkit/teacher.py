"""A trained model whose velocity a distillation objective learns from (`fmkit train
--objective distill --init-from TEACHER`): training supplies it to objectives whose factory
declares a `teacher` parameter."""

from __future__ import annotations

import torch
from torch import Tensor

from fmkit.batch import Cond
from fmkit.conditions import condition_keys
from fmkit.guidance import unconditional
from fmkit.objective import as_model


class Teacher:
    """The teacher's velocity field, with its guidance folded in.

    Loaded once, on first use, onto the device of the first batch, in eval mode with every
    weight frozen: it is never trained, never saved with the student and not wrapped by DDP
    (each process holds its own copy). Its forward passes run under the training step's
    autocast, so it computes in the student's precision.

    Args:
        source: a run folder, checkpoint or model folder (or Hub id), or a loaded Generator.
        guidance: classifier-free guidance weight w of a conditional teacher [default: its
            own]; the student learns the guided velocity v_u + w (v_c - v_u).
        interval: the times at which it guides [default: its own].
    """

    def __init__(
        self,
        source,
        guidance: float | None = None,
        interval: tuple[float, float] | None = None,
    ) -> None:
        self.source, self.guidance, self.interval = source, guidance, interval
        self._generator = None

    def generator(self, device: torch.device | str = "cpu"):
        """The teacher as a frozen fmkit.Generator on `device` (loaded the first time)."""
        from fmkit.generator import Generator

        if self._generator is None:
            device = torch.device(device)
            cuda = [device] if device.type == "cuda" else []
            # Building the network draws its initial weights from the global generator: kept
            # aside, so loading the teacher (on the first step, or the first after a resume)
            # never moves the random numbers the student trains with.
            with torch.random.fork_rng(devices=cuda):
                if isinstance(self.source, Generator):
                    loaded = Generator(self.source.spec, self.source.module, device)
                else:
                    loaded = Generator.load(self.source, device=device)
            loaded.module.eval().requires_grad_(False)
            if self.guidance is None:
                self.guidance = loaded.defaults.guidance
            if self.interval is None:
                self.interval = tuple(loaded.defaults.guidance_interval)
            self._generator = loaded
        return self._generator

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """(B, C, H, W) the teacher's velocity at states x and per-sample times t (B,), under
        conditions `cond` (guided inside the interval when it is conditional)."""
        teacher = self.generator(x.device)
        field = teacher.objective.velocity
        model = as_model(teacher.module)
        keys = condition_keys(cond) if cond is not None else []
        if not keys or self.guidance == 1.0:
            return field(model, cond)(t, x)
        free = unconditional(cond)
        both = {k: torch.cat([cond[k], free[k]]) for k in cond}
        v_c, v_u = field(model, both)(torch.cat([t, t]), torch.cat([x, x])).chunk(2)
        lo, hi = self.interval
        inside = ((t >= lo - 1e-6) & (t <= hi + 1e-6)).to(x.dtype).view(-1, *(1,) * (x.dim() - 1))
        w = 1.0 + inside * (self.guidance - 1.0)  # w inside the interval, 1 (v_c) outside
        return v_u + w * (v_c - v_u)
