"""Stopping a run cleanly: the first SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) asks
the training loop to finish its step, save a checkpoint and exit; a second SIGINT aborts at
once."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from fmkit.errors import FmkitError

SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(FmkitError):
    """Training stopped on a signal after saving; the CLI exits with 128 + the signal number,
    the shell's convention (130 for Ctrl-C, 143 for SIGTERM), so a job script can tell a
    preemption from a failure."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum

    @classmethod
    def after(cls, signum: int, step: int, saved: Path, run: Path, torchrun: bool) -> Interrupted:
        """What stopped the run, the checkpoint that holds it, and the command that goes on."""
        command = f"fmkit train --output {shlex.quote(str(run))} --resume"
        if torchrun:
            command = f"torchrun (the same arguments) -m {command}"
        return cls(
            f"stopped by {SIGNALS.get(signum, signum)} after step {step}; saved {saved}; "
            f"continue with: {command}",
            signum,
        )


class StopRequests:
    """While entered (in the main thread; elsewhere it installs nothing), the first SIGINT or
    SIGTERM sets `signum` and prints what will happen; the run polls `requested` between steps.

    A second SIGINT restores Python's handler and raises KeyboardInterrupt at once: whatever
    was being written is left as a temporary file beside the last complete checkpoint.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                self.__exit__()
                raise KeyboardInterrupt
            return  # a repeated SIGTERM: the save is already on its way
        self.signum = signum
        if self.announce:
            print(
                f"\n{SIGNALS[signum]}: finishing this step and saving a checkpoint "
                "(Ctrl-C again aborts without saving)",
                file=sys.stderr,
                flush=True,
            )
