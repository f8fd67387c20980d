"""Why GreedyLore trails dense / PowerSGD on the short digits run: a float64 diagnostic.

The digits workload is re-run through ``lorecomm.simulate.SimulatedGreedyLore`` (2 simulated
ranks, same model, seed, data stream, optimizer and schedule as the real Gloo run), which
(1) checks that the runtime on real ranks reproduces the reference maths (same final loss), and
(2) measures, on every compressed step, the fraction of the averaged error-corrected gradient's
energy that the selected r directions of the (lazy) basis carry, ||P P^T Hbar||^2 / ||Hbar||^2,
next to the best any rank-r projection could carry (sum of the top r squared singular values
/ total: what a fresh SVD, and approximately PowerSGD's warm-started power iteration, gets),
and (3) varies the refresh interval tau and the rank r.
"""
from __future__ import annotations

import time

import torch

from .tasks import DigitsTask, lr_at, make_optimizer


def _energy_recorder(cls):
    class Rec(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.sel, self.best = [], []

        def _matrix_step(self, p, hs):
            out = super()._matrix_step(p, hs)
            refresh = (self.t - self.start_step - 1) % self.tau == 0
            if not refresh:
                hbar = sum(hs) / len(hs)
                tot = float((hbar ** 2).sum())
                if tot > 0:
                    r = self.ranks[p]
                    sv = torch.linalg.svdvals(hbar) ** 2
                    self.best.append(float(sv[:r].sum()) / tot)
                    self.sel.append(float((out ** 2).sum()) / tot)  # out = P P^T Hbar
            return out
    return Rec


def digits_sim(spec, steps, start, tau, rank, lr=3e-3, opt="adamw", world=2, **kw):
    from lorecomm.simulate import SimulatedGreedyLore
    task = DigitsTask(spec)
    torch.manual_seed(spec.get("seed", 0))
    m = task.build_model()
    names = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
    sim = _energy_recorder(SimulatedGreedyLore)(world, names, rank=rank, update_interval=tau, start_step=start,
                                                seed=spec.get("seed", 0), **kw)
    o = make_optimizer(m.parameters(), opt, lr)
    t0 = time.time()
    for s in range(steps):
        for g in o.param_groups:
            g["lr"] = lr_at(s, steps, lr)
        gs = []
        for r in range(world):
            m.zero_grad()
            task.loss(m, task.train_batch(r, world, s)).backward()
            gs.append([p.grad.detach().double().clone() for p in m.parameters()])
        for p, a in zip(m.parameters(), sim.step(gs)):
            p.grad = a.float()
        o.step()
    ev = task.evaluate(m)
    n = max(1, len(sim.sel))
    return {"tau": tau, "rank": rank, **kw, **ev, "energy_selected": sum(sim.sel) / n,
            "energy_best_rank_r": sum(sim.best) / n, "wall_s": time.time() - t0}


def digits_diagnostic(spec, steps, start, tau, rank, progress=None):
    rows = []
    for cfg in (dict(tau=tau, rank=rank), dict(tau=max(2, tau // 5), rank=rank), dict(tau=tau, rank=2 * rank)):
        r = digits_sim(spec, steps, start, **cfg)
        rows.append(r)
        if progress:
            progress(f"diagnostic digits sim {cfg}: val loss {r['val_loss']:.4f}")
    return rows
