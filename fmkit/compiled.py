"""torch.compile as a default that cannot end a job: the first call of a compiled model (a
training step, or a network evaluation when sampling) runs under a guard that reports the
compile time once and, if the compiler fails (no C++ compiler, an unsupported operation, a
Triton error), switches to the eager model with one warning line and makes the call again."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def compiler_failure(exc: BaseException) -> bool:
    """Whether `exc` is torch.compile's own (Dynamo's or a backend's), not the model's."""
    import torch._dynamo.exc as dynamo

    return isinstance(exc, dynamo.TorchDynamoException)


class FirstCompiledCall:
    """Runs the first call of a compiled model with a way back to eager.

    Args:
        enabled: the model is compiled (otherwise `run` just runs).
        fall_back: switches to the uncompiled model.
        announce: print the note and the warning (rank 0).
        what: the first call, as the note names it ("training step").
        then: what the warning says happens next ("training without it").
    """

    def __init__(
        self,
        enabled: bool,
        fall_back: Callable[[], None],
        announce: bool = True,
        what: str = "step",
        then: str = "going on without it",
    ) -> None:
        self.pending, self.fall_back, self.announce = enabled, fall_back, announce
        self.what, self.then = what, then

    def run(self, call: Callable[[], T]) -> T:
        if not self.pending:
            return call()
        self.pending = False
        # The call is made again after a failure: with the random numbers it started with.
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        start = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            if not compiler_failure(exc):
                raise
            if self.announce:
                cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(f"warning: torch.compile failed ({cause[:200]}); {self.then}")
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self.fall_back()
            return call()
        if self.announce:
            took = time.perf_counter() - start
            print(f"note: torch.compile: the first {self.what} took {took:.1f} s")
        return result
