"""Minibatch optimal-transport coupling: the exact assignment against brute force, pairs that
never cross conditions, shorter pairs than independent ones, and the flag's errors. (That two
processes pair like one is in test_distributed.py.)"""

import itertools

import pytest
import torch
from conftest import one_line_error, train_args

from fmkit import Batch, registry
from fmkit.objective import Draws
from fmkit_plugins.coupling import assignment, couple


def total(cost, picked):
    return cost[torch.arange(len(picked)), picked].sum().item()


@pytest.mark.parametrize("seed", range(5))
def test_the_exact_assignment_is_the_brute_force_optimum(seed):
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    best = min(total(cost, torch.tensor(p)) for p in itertools.permutations(range(6)))
    picked = assignment(cost)
    assert sorted(picked.tolist()) == list(range(6))  # a permutation: every noise used once
    assert total(cost, picked) == pytest.approx(best)


def test_ot_pairs_are_shorter_and_a_permutation_of_the_same_noise():
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(32, 3, 4, 4, generator=g), torch.randn(32, 3, 4, 4, generator=g)
    for method in ("ot", "sinkhorn"):
        x0, seconds = couple(noise, x1, 0, None, method, False, 0.05, torch.Generator())
        assert seconds >= 0
        before = ((x1 - noise) ** 2).sum().item()
        assert ((x1 - x0) ** 2).sum().item() < 0.9 * before, method
    ot, _ = couple(noise, x1, 0, None, "ot", False)
    rows = {tuple(r.flatten().tolist()) for r in noise}
    assert {tuple(r.flatten().tolist()) for r in ot} == rows  # each noise sample once


@pytest.mark.parametrize("kind", ["class", "attributes"])
def test_pairs_never_cross_conditions(kind):
    g = torch.Generator().manual_seed(1)
    n = 24
    x1, noise = torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)
    if kind == "class":
        cond = {"class": torch.arange(n) % 3}
        label = cond["class"].tolist()
    else:
        cond = {"attributes": torch.stack([torch.arange(n) % 2, torch.arange(n) // 12], 1)}
        label = [tuple(r) for r in cond["attributes"].tolist()]
    # Noise row j belongs to sample j's condition; a coupled pair keeps the image's.
    x0, _ = couple(noise, x1, 0, cond, "ot", False)
    owner = {tuple(r.flatten().tolist()): j for j, r in enumerate(noise)}
    for i, row in enumerate(x0):
        assert label[owner[tuple(row.flatten().tolist())]] == label[i]


def test_the_objective_couples_and_logs_the_time_it_took():
    path = registry("paths").build("linear", {})
    build = registry("objectives").build
    images = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def still(x, t, cond=None):  # zero velocity: the loss is the mean squared pair length
        return torch.zeros_like(x)

    losses = {}
    for coupling in ("independent", "ot"):
        objective = build("flow_matching", {"coupling": coupling}, path=path)
        loss = objective.loss(still, Batch(images), Draws(0, 0, 16, slice(0, 16)))
        losses[coupling] = loss.value.item()
        assert ("coupling_s" in loss.logs) == (coupling == "ot")
    assert losses["ot"] < losses["independent"]


def test_coupling_flag_trains_and_is_refused_by_objectives_without_it(faces, tmp_path, run_cli):
    result = run_cli(*train_args(faces, tmp_path / "ot", "--coupling", "ot", "--max-steps", 2))
    assert result.exit_code == 0, result.output
    assert "coupling_s" in (tmp_path / "ot" / "metrics.jsonl").read_text()
    args = train_args(faces, tmp_path / "mf", "--objective", "meanflow", "--coupling", "ot")
    line = one_line_error(run_cli(*args, "--backbone-opt", "two_times=true"))
    assert "--coupling is not an option of objective 'meanflow'" in line
    line = one_line_error(run_cli(*train_args(faces, tmp_path / "x", "--coupling", "nearest")))
    assert "coupling" in line and "nearest" in line
