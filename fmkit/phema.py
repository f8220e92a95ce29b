"""Post-hoc EMA: choose the averaging width after training.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"
(EDM2), section 3: training keeps a few power-function EMA profiles, each weighting the
weights of step tau by about tau^gamma, and stores them at intervals; afterwards, the average
for any relative width sigma_rel is a linear combination of the stored snapshots, found by
least squares between the profiles' weightings of the training steps.

EDM2 solves that least-squares problem between continuous profiles. Here the snapshots'
weightings are the exact discrete ones of the updates training made: update n sets
avg <- beta_n avg + (1 - beta_n) theta_n with beta_n = (1 - 1/n)^(gamma + 1), so the snapshot
at update T weights the weights after update tau by

    w_T(tau) = (1 - (1 - 1/tau)^(gamma + 1)) * (tau / T)^(gamma + 1),     tau = 1..T

(the product of the betas telescopes), and the target is the same weighting for the asked
width, as if training had kept that profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fmkit import checkpoint
from fmkit.errors import FmkitError

DEFAULT_WIDTHS = "0.05,0.10"  # EDM2's two stored profiles
SNAPSHOTS = 16  # per run when the snapshot interval is left to fmkit
FOLDER = "phema"  # in the run folder


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile of relative width sigma_rel: the
    profile's standard deviation over its mean age, sqrt((g + 1) / ((g + 2)^2 (g + 3))),
    solved for g > -1 (EDM2, eq. 3; the largest real root of a cubic)."""
    if not 0 < sigma_rel < 1 / math.sqrt(3):  # g -> -1 gives the widest profile, 1/sqrt(3)
        raise FmkitError(f"a relative EMA width must be in (0, 0.577), got {sigma_rel:g}")
    s2 = sigma_rel**2
    # s2 (g + 2)^2 (g + 3) - (g + 1) = 0, expanded in powers of g.
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real[real > -1].max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def parse_widths(text: str) -> tuple[float, ...]:
    """'0.05,0.1' -> (0.05, 0.1); 'off' or 'none' -> ()."""
    if text.strip().lower() in ("off", "none", ""):
        return ()
    try:
        widths = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise FmkitError(
            f"relative EMA widths are numbers separated by commas, got {text!r}"
        ) from None
    for width in widths:
        sigma_rel_to_gamma(width)  # in range
    return widths


class PowerEMA:
    """Power-function EMA profiles of a model's weights, kept during training.

    Args:
        model: the trained module (its state_dict's floating-point entries are averaged, the
            others copied).
        widths: the profiles' relative widths sigma_rel.
    """

    def __init__(self, model: nn.Module, widths: tuple[float, ...]) -> None:
        self.widths = tuple(widths)
        self.gammas = tuple(sigma_rel_to_gamma(w) for w in widths)
        self.names = list(model.state_dict())
        self.averages = [[t.detach().clone() for t in model.state_dict().values()] for _ in widths]
        self.updates = 0
        self._source: nn.Module | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in the weights after update n = self.updates + 1 (the first copies them)."""
        if self._source is not model:  # walk the state once, not per step
            self._source = model
            values = list(model.state_dict().values())
            self._floats = [i for i, t in enumerate(values) if t.is_floating_point()]
            self._others = [i for i, t in enumerate(values) if not t.is_floating_point()]
            self._values = values
        self.updates += 1
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            beta = (1 - 1 / self.updates) ** (gamma + 1)
            torch._foreach_lerp_(
                [average[i] for i in self._floats], [self._values[i] for i in self._floats],
                1.0 - beta,
            )  # fmt: skip
            for i in self._others:
                average[i].copy_(self._values[i])

    def tensors(self) -> dict[str, Tensor]:
        """Every profile's average, keyed "{profile}.{state name}" (checkpoints, snapshots)."""
        return {
            f"{p}.{name}": tensor
            for p, average in enumerate(self.averages)
            for name, tensor in zip(self.names, average, strict=True)
        }

    def load(self, tensors: dict[str, Tensor], updates: int) -> None:
        for p, average in enumerate(self.averages):
            for name, tensor in zip(self.names, average, strict=True):
                tensor.copy_(tensors[f"{p}.{name}"])
        self.updates = updates

    def snapshot(self, path: Path) -> Path:
        """Write the profiles as they are now to `path` (a .safetensors file)."""
        meta = {"updates": self.updates, "widths": list(self.widths), "gammas": list(self.gammas)}
        return checkpoint.save(path, self.tensors(), meta)


def snapshot_name(step: int) -> str:
    return f"{FOLDER}/phema_{step:08d}.safetensors"


def storage_note(widths: tuple[float, ...], every: int | None, model: nn.Module) -> str:
    """What a run's snapshots cost, for its start-up summary ("" when none are kept)."""
    if not widths:
        return ""
    size = 4 * len(widths) * sum(t.numel() for t in model.state_dict().values())  # float32
    interval = "every step" if every == 1 else f"every {every:,} steps"
    listed = ", ".join(f"{w:g}" for w in widths)
    return f"post-hoc EMA (sigma_rel {listed}) {interval}, {size / 2**20:,.0f} MiB each"


def drop_after(run: Path, step: int) -> None:
    """Remove the snapshots of steps after `step` (a resumed run trains them again, and may
    store them at other steps)."""
    for path in (Path(run) / FOLDER).glob("phema_*.safetensors"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()


def default_interval(total: int | None) -> int:
    """Steps between snapshots when not given: SNAPSHOTS over a run of known length."""
    return max(1, math.ceil(total / SNAPSHOTS)) if total else 5000


# The least-squares solve.


def profile_weights(gamma: float, at: int, taus: np.ndarray) -> np.ndarray:
    """How the profile of exponent gamma, as stored after update `at`, weights the weights
    after updates `taus` (1-based); 0 past `at` (see the module docstring)."""
    taus = taus.astype(np.float64)
    w = (1 - (1 - 1 / taus) ** (gamma + 1)) * (taus / at) ** (gamma + 1)
    return np.where(taus <= at, w, 0.0)


def solve(stored: list[tuple[int, float]], at: int, gamma: float, chunk: int = 1 << 16):
    """Coefficients c of the stored profiles [(updates, gamma), ...] whose combination best
    matches the profile `gamma` at update `at`, in the least-squares sense over the weights
    of updates 1..at; summing to 1 (a constant weight trajectory is reproduced exactly).
    Returns (c, relative error of the matched weighting)."""
    k = len(stored)
    gram, cross, target_norm = np.zeros((k, k)), np.zeros(k), 0.0
    for start in range(1, at + 1, chunk):
        taus = np.arange(start, min(start + chunk, at + 1))
        rows = np.stack([profile_weights(g, t, taus) for t, g in stored])  # (k, chunk)
        target = profile_weights(gamma, at, taus)
        gram += rows @ rows.T
        cross += rows @ target
        target_norm += target @ target
    coeffs = np.linalg.lstsq(gram, cross, rcond=None)[0]
    coeffs = coeffs / coeffs.sum()
    error = coeffs @ gram @ coeffs - 2 * coeffs @ cross + target_norm
    return coeffs, math.sqrt(max(error, 0.0) / target_norm)


@dataclass
class Snapshot:
    path: Path
    updates: int
    gammas: list[float]


def snapshots(run: Path) -> list[Snapshot]:
    """The run's stored snapshots, oldest first."""
    found = []
    for path in sorted((Path(run) / FOLDER).glob("phema_*.safetensors")):
        meta = checkpoint.read_metadata(path)
        found.append(Snapshot(path, int(meta["updates"]), list(meta["gammas"])))
    return found


@dataclass
class Reconstruction:
    sigma_rel: float
    gamma: float
    step: int
    state: dict[str, Tensor]
    coefficients: list[float]
    error: float  # relative L2 error of the matched weighting of the training steps


def reconstruct(
    run: Path, widths: tuple[float, ...], step: int | None = None
) -> list[Reconstruction]:
    """The post-hoc EMA of width sigma_rel for each of `widths`, at `step` (default: the last
    snapshot), from the run's snapshots up to that step."""
    found = snapshots(run)
    if not found:
        raise FmkitError(
            f"{run} has no post-hoc EMA snapshots ({FOLDER}/): runs keep them unless trained "
            "with --phema off (or by an fmkit before post-hoc EMA)"
        )
    at = found[-1].updates if step is None else step
    if at > found[-1].updates:
        raise FmkitError(f"{run}'s last EMA snapshot is at step {found[-1].updates}, before {at}")
    used = [s for s in found if s.updates <= at]
    if not used:
        raise FmkitError(
            f"{run} has no EMA snapshot at or before step {at} (the first is at {found[0].updates})"
        )
    stored = [(s.updates, g) for s in used for g in s.gammas]
    # Solve for every width first, then read each snapshot file once for all of them.
    plans = []
    for width in widths:
        gamma = sigma_rel_to_gamma(width)
        coeffs, error = solve(stored, at, gamma)
        plans.append((width, gamma, coeffs, error))
    sums: list[dict[str, Tensor]] = [{} for _ in widths]
    dtypes: dict[str, torch.dtype] = {}
    i = 0
    for snap in used:
        tensors, _ = checkpoint.load(snap.path)
        for p in range(len(snap.gammas)):
            prefix = f"{p}."
            for key, tensor in tensors.items():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix) :]
                dtypes[name] = tensor.dtype
                for (_, _, coeffs, _), acc in zip(plans, sums, strict=True):
                    if tensor.is_floating_point():
                        term = tensor.double() * coeffs[i]
                        acc[name] = term if name not in acc else acc[name] + term
                    else:
                        acc[name] = tensor  # counters: the newest
            i += 1
    return [
        Reconstruction(
            width, gamma, at,
            {k: v.to(dtypes[k]) for k, v in acc.items()},
            coeffs.tolist(), error,
        )
        for (width, gamma, coeffs, error), acc in zip(plans, sums, strict=True)
    ]  # fmt: skip
