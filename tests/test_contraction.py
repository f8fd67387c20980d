"""Lore's contraction guarantee, measured on adversarial gradients (docs/LORE.md, "The contraction guarantee").

On a step that explores, Lore projects each a x b matrix onto V = orth([T, W]): T its tracked
range (t = max(r - 1, 1) columns, whatever it is: at r = 1 the random direction joins the one
tracked), W one fresh Gaussian direction that no gradient has seen. For every X,
E_W ||X - V V^T X||^2 = ||X_perp||^2 (1 - 1/(a - t)) <= (1 - delta) ||X||^2 with
delta = 1/(a - t), X_perp the part of X outside T; with the coin of probability p the bound
is 1 - p delta. Every test runs at r = 3 and at r = 1. The tests run the real engine (one rank, an fp32 wire so the rounding of the
factors does not blur the numbers) and the float64 simulation on gradients built to defeat the
tracker: orthogonal to it, rank-1 spikes, a stale tracker, and check the measured mean against
the bound (it is tight for gradients orthogonal to the tracked part).
"""
from __future__ import annotations

import math

import pytest
import torch

from distributed import run_ranks

A, B = 12, 20
RANKS = pytest.mark.parametrize("R", [3, 1])


def _delta(R):
    """1 / (a - t): 0.1 at r = 3 (t = 2), 1/11 at r = 1 (t = 1)."""
    return 1 / (A - max(R - 1, 1))


def _adversaries(R):
    """Gradients that defeat the tracker exactly (in floating point too: exact zeros, so the
    orthonormalisation has no rounding noise to amplify into the gradient's range)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    # the tracker's right factor Q: its rows are the first R coordinate axes of R^B; gradients
    # with zero columns there give H Q^T = 0 exactly, the tracked basis falls back to the first
    # axes of R^A, and gradients with zero rows there lie entirely outside it
    Q = torch.zeros(R, B)
    Q[torch.arange(R), torch.arange(R)] = 1.0
    X = torch.zeros(A, B, dtype=torch.float64)
    X[R:, R:] = torch.randn(A - R, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, B - R, generator=g, dtype=torch.float64)
    out["orthogonal to the tracker"] = X
    spike = torch.zeros(A, B, dtype=torch.float64)
    spike[-1, R:] = 50 * torch.randn(B - R, generator=g, dtype=torch.float64)
    out["rank-1 spike"] = spike
    # a stale tracker: Q from an unrelated old gradient, X a fresh full-rank matrix
    out["stale tracker"] = torch.randn(A, B, generator=g, dtype=torch.float64)
    stale_Q = torch.randn(R, B, generator=g)
    return out, Q, stale_Q


def _measure(rank, world, explore, trials, R):
    import lorecomm

    w = torch.nn.Parameter(torch.zeros(A, B))
    state = lorecomm.LoreState(rank=R, start_step=0, explore=explore, wire=torch.float32,
                               min_compression_rate=0.1, auto_dense=False).bind([("w", w)])
    xs, Q, stale_Q = _adversaries(R)
    state.reduce(torch.zeros(A * B), [w])  # places the state (E, Q) of the matrix
    ts = state._param_tensors()["w"]
    res = {}
    for name, X in xs.items():
        ratios = []
        for _ in range(trials):  # every step draws a new W
            ts["E"].zero_()
            ts["Q"].copy_(stale_Q if name == "stale tracker" else Q)
            state.reduce(X.float().reshape(-1).clone(), [w])
            ratios.append(float(ts["E"].double().square().sum() / X.square().sum()))
        res[name] = ratios
    return res


def _check(ratios, bound, tight):
    n = len(ratios)
    mean = sum(ratios) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in ratios) / (n - 1))
    err = 4 * sd / math.sqrt(n) + 1e-6
    assert max(ratios) <= 1 + 1e-6, "a step must never increase the residual"
    assert mean <= bound + err, f"mean residual ratio {mean:.4f} > bound {bound:.4f} (+{err:.4f})"
    if tight:
        assert abs(mean - bound) <= err, f"mean {mean:.4f} vs the exact value {bound:.4f} (+-{err:.4f})"


@RANKS
def test_every_exploring_step_contracts_every_gradient(R):
    delta = _delta(R)
    res = run_ranks(_measure, 1, 1.0, 400, R)[0]
    _check(res["orthogonal to the tracker"], 1 - delta, tight=True)
    _check(res["rank-1 spike"], 1 - delta, tight=True)
    _check(res["stale tracker"], 1 - delta, tight=False)


@RANKS
def test_the_coin_scales_the_guarantee(R):
    p, delta = 0.25, _delta(R)
    res = run_ranks(_measure, 1, p, 600, R)[0]
    _check(res["orthogonal to the tracker"], 1 - p * delta, tight=True)


@RANKS
def test_without_exploration_an_adversary_is_not_contracted(R):
    """Why the random direction exists: a gradient orthogonal to the tracker is not sent at all."""
    res = run_ranks(_measure, 1, 0.0, 20, R)[0]
    assert min(res["orthogonal to the tracker"]) > 1 - 1e-6


@RANKS
def test_the_simulation_obeys_the_same_bound(R):
    from lorecomm.simulate import SimulatedLore

    xs, Q, _ = _adversaries(R)
    X = xs["orthogonal to the tracker"]
    delta = _delta(R)
    ratios = []
    sim = SimulatedLore(1, [("w", (A, B))], rank=R, start_step=0, explore=1.0, wire=torch.float64,
                        min_compression_rate=0.1)
    for _ in range(400):
        sim.E[0][0].zero_()
        sim.Q[0] = Q.double()
        sim.step([[X]])
        ratios.append(float(sim.E[0][0].square().sum() / X.square().sum()))
    _check(ratios, 1 - delta, tight=True)
