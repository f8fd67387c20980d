"""Noisy quadratics with controlled Hessian spectra, N simulated ranks (float64).

Problem (the "noisy quadratic model"): parameter W is an a x b matrix, loss
f(W) = 1/2 tr(W^T H W) with H = Q diag(lambda) Q^T (a x a, random rotation Q), optimum 0.
Rank i's stochastic gradient is H W + sigma H^{1/2} Z_i (Z_i iid N(0, 1)), i.e. gradient noise
with covariance proportional to H, like least squares. Spectra (lambda_max = 1):

- ``lowrank``: k eigenvalues log-spaced in [0.05, 1], the other a - k are 0,
- ``powerlaw``: lambda_j = j^-1 (j = 1..a),
- ``flat``: all a eigenvalues log-spaced in [0.05, 1].

The smallest non-zero eigenvalue is about the same in all three (0.03-0.05), so dense SGD needs
a similar number of iterations; what differs is tr(H) / lambda_max (k, ~ln a, ~a/3), the quantity
the randomized compressors' penalty depends on.

Measured: iterations until f(W) <= target * f(W_0), for plain SGD (the setting of arXiv
2411.12898's analysis, which the claims use), and again under momentum SGD (heavy ball, 0.9) and
AdamW (Adam moments 0.9/0.999, eps 1e-8; no weight decay on a quadratic whose optimum is 0), each
with the step size picked per method from one fixed grid per optimizer (the same grid for every
method; the best step size is reported). Compressors come from ``lorecomm.simulate``.
PowerSGD (``SimulatedPowerSGD``: warm-started power iteration with error feedback, as torch's hook)
runs at the same rank r and with the same min_compression_rate as GreedyLore (MIN_RATE), so both
compress the same matrix; here that is the single matrix W for both.
"""
from __future__ import annotations

import math
import time

import torch

SPECTRA = ("lowrank", "powerlaw", "flat")
MIN_RATE = 2.0  # min_compression_rate passed to both GreedyLore and PowerSGD (GreedyLore's default)


def spectrum(kind, a, k=4):
    if kind == "lowrank":
        lam = torch.zeros(a, dtype=torch.float64)
        lam[:k] = torch.logspace(0, math.log10(0.05), k, dtype=torch.float64)
    elif kind == "powerlaw":
        lam = 1.0 / torch.arange(1, a + 1, dtype=torch.float64)
    elif kind == "flat":
        lam = torch.logspace(0, math.log10(0.05), a, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return lam


class NQM:
    def __init__(self, kind, a=32, b=64, sigma=0.5, seed=0, k=4):
        g = torch.Generator().manual_seed(seed)
        self.kind, self.a, self.b, self.sigma = kind, a, b, sigma
        self.lam = spectrum(kind, a, k)
        Q, _ = torch.linalg.qr(torch.randn(a, a, generator=g, dtype=torch.float64))
        self.Q = Q
        self.H = Q @ torch.diag(self.lam) @ Q.t()
        self.Hs = Q @ torch.diag(self.lam.sqrt()) @ Q.t()
        self.W0 = torch.randn(a, b, generator=g, dtype=torch.float64)

    def loss(self, W):
        return 0.5 * float((W * (self.H @ W)).sum())

    def grads(self, W, N, gen):
        base = self.H @ W
        return [[base + self.sigma * (self.Hs @ torch.randn(self.a, self.b, generator=gen, dtype=torch.float64))]
                for _ in range(N)]


def make_compressor(method, N, shape, rank, tau, seed=0):
    """None for dense; otherwise a lorecomm.simulate object."""
    from lorecomm.simulate import SimulatedGreedyLore, SimulatedPowerSGD, SimulatedRandomLinear
    params = [("w", shape)]
    if method == "dense":
        return None
    g = {"greedylore": {}, "greedy-fixed": dict(selection="fixed"),
         "greedy-random": dict(selection="random"), "greedy-noef": dict(error_feedback=False)}
    if method in g:
        return SimulatedGreedyLore(N, params, rank=rank, update_interval=tau, start_step=0, seed=seed,
                                   min_compression_rate=MIN_RATE, **g[method])
    if method == "powersgd":
        sim = SimulatedPowerSGD(N, params, rank=rank, start_step=0, min_compression_rate=MIN_RATE,
                                error_feedback=True, seed=seed)
        if sim.ranks[0] is None:
            raise ValueError(f"PowerSGD would not compress {shape} at rank {rank}")
        return sim
    if method in ("randk", "haar", "gaussian"):
        return SimulatedRandomLinear(N, params, kind=method, rank=rank, error_feedback=False, seed=seed,
                                     start_step=0)
    raise ValueError(method)


OPTIMIZERS = ("sgd", "sgdm", "adamw")


def run_sgd(prob, method, N, lr, steps, rank, tau, target, seed=0, record=False, cutoff=None, opt="sgd"):
    """Returns dict(iters to target or None, final rel loss, curve, bytes/step).

    ``opt``: "sgd" (W -= lr g), "sgdm" (heavy ball, momentum 0.9) or "adamw" (Adam moments, no
    weight decay), all on the averaged (reconstructed) gradient g.
    """
    if opt not in OPTIMIZERS:
        raise ValueError(f"opt must be one of {OPTIMIZERS}, got {opt!r}")
    m = torch.zeros(prob.a, prob.b, dtype=torch.float64)
    v = torch.zeros(prob.a, prob.b, dtype=torch.float64)
    comp = make_compressor(method, N, (prob.a, prob.b), rank, tau, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    W = prob.W0.clone()
    f0 = prob.loss(W)
    curve = [1.0]
    hit = None
    for t in range(1, steps + 1):
        gs = prob.grads(W, N, gen)
        if comp is None:
            g = sum(x[0] for x in gs) / N
        else:
            g = comp.step(gs)[0]
        if opt == "sgd":
            W = W - lr * g
        elif opt == "sgdm":
            m = 0.9 * m + g
            W = W - lr * m
        else:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            W = W - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        rel = prob.loss(W) / f0
        if not math.isfinite(rel) or rel > 1e3:
            curve.append(float("inf"))
            break
        curve.append(rel)
        if hit is None and rel <= target:
            hit = t
            if not record:
                break
        if cutoff is not None and t >= cutoff:
            break
    nbytes = (comp.bytes_sent / max(1, len(curve) - 1)) if comp is not None else 4 * prob.a * prob.b
    return {"iters": hit, "final": curve[-1], "curve": curve, "bytes_per_step": nbytes}


def best_over_grid(prob, method, N, lrs, steps, rank, tau, target, seed=0, opt="sgd"):
    """Largest step size first; a run stops once it cannot beat the best so far."""
    best = None
    for lr in sorted(lrs, reverse=True):
        cut = best[1]["iters"] if best is not None and best[1]["iters"] is not None else None
        r = run_sgd(prob, method, N, lr, steps, rank, tau, target, seed, cutoff=cut, opt=opt)
        r["lr"] = lr
        key = (r["iters"] if r["iters"] is not None else steps + 1, r["final"])
        if best is None or key < best[0]:
            best = (key, r)
    return best[1]


def spectrum_experiment(methods=("dense", "randk", "haar", "gaussian", "greedylore", "powersgd"), a=32, b=64, rank=4,
                        N=4, sigma=0.3, target=0.05, steps=1500, tau=50, lrs=None, seed=0,
                        ablations=("greedy-fixed", "greedy-random", "greedy-noef"), progress=None,
                        other_opts=None):
    """Iterations to target per (spectrum, method) under plain SGD, with loss curves at each method's
    best lr; ``other_opts`` {optimizer: step-size grid}: the same methods (no ablations) under
    momentum SGD / AdamW, in ``out["other_opts"][opt][spectrum][method]``."""
    lrs = lrs or [2.0 ** -i for i in range(0, 8)]
    other_opts = other_opts or {}
    out = {"config": dict(a=a, b=b, rank=rank, N=N, sigma=sigma, target=target, steps=steps, tau=tau,
                          lrs=lrs, seed=seed, other_opts=other_opts), "results": {},
           "other_opts": {o: {} for o in other_opts}}
    for kind in SPECTRA:
        prob = NQM(kind, a, b, sigma, seed)
        res = {}
        ms = list(methods) + (list(ablations) if kind == "powerlaw" else [])
        for m in ms:
            t0 = time.time()
            r = best_over_grid(prob, m, N, lrs, steps, rank, tau, target, seed)
            r["wall_s"] = time.time() - t0
            res[m] = r
            if progress:
                progress(f"quadratic {kind} {m}: iters={r['iters']} lr={r['lr']}")
        out["results"][kind] = {"lam": prob.lam.tolist(), "methods": res}
        for o, grid in other_opts.items():
            res_o = {}
            for m in methods:
                t0 = time.time()
                r = best_over_grid(prob, m, N, grid, steps, rank, tau, target, seed, opt=o)
                r.pop("curve", None)
                r["wall_s"] = time.time() - t0
                res_o[m] = r
                if progress:
                    progress(f"quadratic {kind} {m} ({o}): iters={r['iters']} lr={r['lr']}")
            out["other_opts"][o][kind] = res_o
    return out


def speedup_experiment(methods=("dense", "greedylore", "powersgd"), Ns=(1, 2, 4, 8, 16), kind="powerlaw", a=32, b=64, rank=4,
                       sigma=2.0, target=0.02, steps=2000, tau=50, lrs=None, seed=0, progress=None):
    """Steps to target vs number of ranks N (best step size per N from one grid)."""
    lrs = lrs or [2.0 ** -i for i in range(0, 10)]
    prob = NQM(kind, a, b, sigma, seed)
    out = {"config": dict(kind=kind, a=a, b=b, rank=rank, sigma=sigma, target=target, steps=steps, tau=tau,
                          lrs=lrs, Ns=list(Ns), seed=seed), "results": {}}
    for m in methods:
        out["results"][m] = {}
        for N in Ns:
            t0 = time.time()
            r = best_over_grid(prob, m, N, lrs, steps, rank, tau, target, seed)
            r.pop("curve", None)
            r["wall_s"] = time.time() - t0
            out["results"][m][str(N)] = r
            if progress:
                progress(f"speedup {m} N={N}: iters={r['iters']} lr={r['lr']}")
    return out
