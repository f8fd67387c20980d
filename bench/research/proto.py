"""Compressor prototypes for bench/research/sim_train.py (float64, N simulated ranks).

Spec strings: ``dense``, ``dense-bf16``, ``psgd:R`` (torch PowerSGD's algorithm), ``greedy:R`` (the
paper's GreedyLore via lorecomm.simulate), and ``lore-<variant>:R[:key=val...]`` prototypes of the
new default compressor (variants: two, gram, q1; keys: wire=fp32|bf16|int8, explore=K, init=warm|rand,
order=svd|qr|rows: rows is the production step; alloc=shape|energy|share, every=K, grow=F: ranks moved
between matrices by energy per byte, see Lore.__init__). int8: per-direction scales, all-gathered (see allreduce_mean).
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def wire_round(x, wire):
    """x as it goes on the wire. int8: per-row scales (the row's max |x| / 127), round to nearest;
    rows are a factor R's directions, a sketch's rows are passed transposed (see int8_rows)."""
    if wire == "int8":
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-300) / 127
        return (x / scale).round().clamp(-127, 127) * scale.float().to(F64)
    return x.to(torch.bfloat16).to(F64) if wire == "bf16" else x.float().to(F64) if wire == "fp32" else x


def allreduce_mean(xs, wire, int8_rows=True):
    """What every rank holds after a sum all-reduce of x_i / N in the wire dtype. int8 cannot be
    summed on the wire (per-rank scales): it is all-gathered and every rank averages the
    dequantized values exactly; ``int8_rows=False`` puts the scales on columns instead."""
    N = len(xs)
    if wire == "int8":
        q = [wire_round(x, wire) if int8_rows else wire_round(x.t(), wire).t() for x in xs]
        return sum(q) / N
    s = sum(wire_round(x / N, wire) for x in xs)
    return wire_round(s, wire)


def wbytes(wire):
    return {"bf16": 2, "int8": 1}.get(wire, 4)


def int8_scale_bytes(wire, rows):
    """The fp32 scales int8 sends with ``rows`` rows (0 for other wires)."""
    return 4 * rows if wire == "int8" else 0


def gaussian(shape, seed, *keys):
    g = torch.Generator().manual_seed(hash((seed,) + keys) % (2 ** 62))
    return torch.randn(*shape, generator=g, dtype=F64)


def orth(Y):
    Q, R = torch.linalg.qr(Y)
    d = torch.sign(torch.diagonal(R))
    return Q * torch.where(d == 0, torch.ones_like(d), d)


class Base:
    def __init__(self, N, params, start_step, seed, rank, wire="fp32", min_rate=2.0, dense_patterns=(),
                 dense_wire=None, orient=True):
        self.N, self.params, self.start, self.seed, self.rank = N, params, start_step, seed, rank
        self.wire, self.dense_wire = wire, dense_wire or wire
        self.orient = orient
        self.t = 0
        self.bytes_sent = 0
        self.mats = {}
        for p, (name, shape) in enumerate(params):
            if len(shape) < 2 or any(s in name for s in dense_patterns):
                continue
            m, n = shape[0], math.prod(shape[1:])
            r = min(rank, m, n)
            if (m + n) * r * min_rate < m * n:
                self.mats[p] = r
        self.E = {}
        self.setup()

    def setup(self):
        pass

    def shape(self, p):
        name, shape = self.params[p]
        m, n = shape[0], math.prod(shape[1:])
        return m, n

    def orient_(self, p, g):
        m, n = self.shape(p)
        x = g.reshape(m, n).to(F64)
        return x.t() if (self.orient and m > n) else x

    def unorient(self, p, x):
        m, n = self.shape(p)
        return (x.t() if (self.orient and m > n) else x).reshape(self.params[p][1])

    def step(self, grads):
        self.t += 1
        N = self.N
        out = []
        dense_phase = self.t <= self.start
        for p, (name, shape) in enumerate(self.params):
            gs = [grads[i][p].to(F64) for i in range(N)]
            if dense_phase or p not in self.mats:
                w = "fp32" if dense_phase else self.dense_wire
                out.append(allreduce_mean(gs, w))
                self.bytes_sent += wbytes(w) * gs[0].numel()
                if dense_phase and self.t == self.start and p in self.mats:
                    self.warm(p, self.orient_(p, out[-1]))
                continue
            hs = [self.orient_(p, g) + self.E.get((i, p), 0) for i, g in enumerate(gs)]
            out.append(self.unorient(p, self.mat_step(p, hs)))
        return out

    def warm(self, p, gbar):
        pass


class Dense(Base):
    def __init__(self, N, params, start_step, seed, wire="fp32"):
        super().__init__(N, params, 10 ** 9, seed, 1, wire)


class PowerSGD(Base):
    """torch's powerSGD_hook maths: M = G + E (m x n, unoriented), P = mean(M Q), orthonormalised,
    Q = mean(M^T P), out = P Q^T, E_i = M_i - out; Q warm-started; fp32."""

    def setup(self):
        self.Q = {p: gaussian((self.shape(p)[1], r), self.seed, p) for p, r in self.mats.items()}

    def mat_step(self, p, ms):
        N = self.N
        P = orth(allreduce_mean([m @ self.Q[p] for m in ms], "fp32"))
        Q = allreduce_mean([m.t() @ P for m in ms], "fp32")
        self.Q[p] = Q
        out = P @ Q.t()
        for i in range(N):
            self.E[(i, p)] = ms[i] - out
        self.bytes_sent += 4 * (P.numel() + Q.numel())
        return out


class Lore(Base):
    def __init__(self, N, params, start_step, seed, rank, variant="gram", wire="bf16", explore=0, init="warm",
                 order="svd", ef="local", qexp=0, alloc="shape", every=10, grow=0.5, **kw):
        self.variant, self.explore, self.init, self.order, self.ef, self.qexp = variant, explore, init, order, ef, qexp
        # alloc=energy|share (variant two): every ``every`` steps the directions move between matrices
        # at constant bytes, to the ones whose weakest tracked direction carries the most energy per
        # byte (``energy``: absolute, from the shared Rbar rows; ``share``: as a fraction of the
        # matrix's averaged-gradient energy); a direction not tracked yet is valued at ``grow`` x the
        # weakest tracked one, so a matrix grows only where that clearly pays
        self.alloc, self.every, self.grow = alloc, every, grow
        self.S, self.tot = {}, {}
        if wire == "int8":  # int8 is for the factors; dense leftovers go in bf16
            kw.setdefault("dense_wire", "bf16")
        super().__init__(N, params, start_step, seed, rank, wire, **kw)

    def setup(self):
        self.P, self.Q = {}, {}

    def a_b(self, p):
        m, n = self.shape(p)
        return (min(m, n), max(m, n)) if self.orient else (m, n)

    def warm(self, p, gbar):
        a, b = gbar.shape
        r = self.mats[p]
        if self.init == "warm":
            self.P[p] = orth(gbar @ gaussian((b, r), self.seed, p, 0))
            self.Q[p] = gbar.t() @ self.P[p]

    def basis(self, p, Y):
        """Shared basis for the next step from the all-reduced sketch Y (a x r)."""
        r = self.mats[p]
        k = min(self.explore, r - 1)
        if k == 0 and self.order == "qr":
            return orth(Y)
        U = torch.linalg.svd(Y, full_matrices=False).U if self.order == "svd" else orth(Y)
        T = U[:, :r - k]
        if k == 0:
            return T
        Om = gaussian((Y.shape[0], k), self.seed, p, self.t, 7)
        return orth(torch.cat([T, Om], 1))

    def mat_step(self, p, hs):
        N, wire = self.N, self.wire
        a, b = hs[0].shape
        r = self.mats[p]
        if p not in self.P:  # no warm init: random orthonormal start
            self.P[p] = orth(gaussian((a, r), self.seed, p, 1))
            self.Q[p] = gaussian((b, r), self.seed, p, 2)
        if self.variant == "two":
            Q = self.Q[p]
            if self.qexp:  # fresh random right-side columns replace the least energetic ones
                Q = Q.clone()
                Q[:, -self.qexp:] = gaussian((b, self.qexp), self.seed, p, self.t, 9) * Q[:, 0].norm() / b ** 0.5
            if self.order == "rows":  # production: drop the weakest rows of Q, append fresh random directions
                k = min(self.explore, r - 1)
                Y = allreduce_mean([h @ Q[:, :r - k] for h in hs], wire, int8_rows=False)
                cols = [Y] + ([gaussian((a, k), self.seed, p, self.t, 7)] if k else [])
                P = orth(torch.cat(cols, 1))
            else:
                Y = allreduce_mean([h @ Q for h in hs], wire)
                P = self.basis(p, Y)
            Rt = [wire_round(P.t() @ h, wire) for h in hs]
            Rbar = allreduce_mean(Rt, wire) if wire != "int8" else sum(Rt) / N  # Rt already on the wire
            out = P @ Rbar
            for i in range(N):
                self.E[(i, p)] = hs[i] - (P @ Rt[i] if self.ef == "local" else out)
            # next Q: rows of Rbar by energy, most energetic first
            order = Rbar.norm(dim=1).argsort(descending=True)
            self.Q[p] = Rbar[order].t()
            if self.alloc != "shape":
                self.S[p] = Rbar[order].pow(2).sum(1)
                self.tot[p] = (sum(hs) / N).pow(2).sum()
            k = min(self.explore, r - 1) if self.order == "rows" else 0
            self.bytes_sent += wbytes(wire) * (a * (r - k) + r * b) + int8_scale_bytes(wire, 2 * r - k)
            return out
        P = self.P[p]
        Rt = [wire_round(P.t() @ h, wire) for h in hs]
        for i in range(N):
            self.E[(i, p)] = hs[i] - P @ Rt[i]
        if self.variant == "gram":
            Ys = [h @ Rt[i].t() for i, h in enumerate(hs)]
        elif self.variant == "q1":
            Ys = [h @ self.Q[p] for h in hs]
        else:
            raise ValueError(self.variant)
        Rbar = allreduce_mean(Rt, wire)
        Y = allreduce_mean(Ys, wire)
        self.Q[p] = Rbar.t()
        self.P[p] = self.basis(p, Y)
        self.bytes_sent += wbytes(wire) * (a * r + r * b)
        return P @ Rbar


    def step(self, grads):
        out = super().step(grads)
        if self.alloc != "shape" and self.t > self.start and (self.t - self.start) % self.every == 0:
            self.reallocate()
        return out

    def reallocate(self):
        """Ranks by energy per byte at the same total bytes; every rank computes the same from Rbar."""
        cost = {p: sum(self.a_b(p)) for p in self.mats}
        budget = sum(cost[p] * r for p, r in self.mats.items())
        cand = []
        for p, r in self.mats.items():
            a, b = self.a_b(p)
            s = self.S[p] / (self.tot[p] if self.alloc == "share" else 1.0)
            vals = s.tolist() + [float(s[-1]) * self.grow ** (j + 1) for j in range(min(r, a - r))]
            cand += [(v / cost[p], -j, p) for j, v in enumerate(vals)]
        new = {p: 1 for p in self.mats}
        spent = sum(cost[p] for p in self.mats)
        for v, negj, p in sorted(cand, reverse=True):
            if -negj == 0:
                continue  # rank 1 is the floor, already counted
            if -negj == new[p] and spent + cost[p] <= budget:
                new[p] += 1
                spent += cost[p]
        for p, r in new.items():
            Q, old = self.Q[p], self.mats[p]
            if r < old:
                self.Q[p] = Q[:, :r]
            elif r > old:
                fresh = gaussian((Q.shape[0], r - old), self.seed, p, self.t, 11) * (Q[:, -1].norm() / Q.shape[0] ** 0.5)
                self.Q[p] = torch.cat([Q, fresh], 1)
            self.mats[p] = r


class Greedy:
    def __init__(self, N, params, start_step, seed, rank, **kw):
        from lorecomm.simulate import SimulatedGreedyLore
        self.sim = SimulatedGreedyLore(N, params, rank=rank, start_step=start_step, seed=seed,
                                       update_interval=kw.pop("tau", 40), **kw)

    @property
    def bytes_sent(self):
        return self.sim.bytes_sent

    def step(self, grads):
        return self.sim.step(grads)


def _val(v):
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return v


def make(spec, N, params, start, seed):
    parts = spec.split(":")
    name = parts[0]
    r = int(parts[1]) if len(parts) > 1 else 8
    kw = dict(p.split("=", 1) for p in parts[2:])
    kw = {k: _val(v) for k, v in kw.items()}
    if name == "dense":
        return Dense(N, params, start, seed)
    if name == "dense-bf16":
        return Dense(N, params, start, seed, wire="bf16")
    if name == "psgd":
        return PowerSGD(N, params, start, seed, r, orient=False)
    if name == "greedy":
        return Greedy(N, params, start, seed, r, **kw)
    if name == "sim-psgd":
        from lorecomm.simulate import SimulatedPowerSGD
        return SimulatedPowerSGD(N, params, rank=r, start_step=start, seed=seed)
    if name == "sim-lore":  # the production algorithm's float64 reference
        from lorecomm.simulate import SimulatedLore
        if "dense" in kw:
            kw["dense_name_patterns"] = tuple(p for p in str(kw.pop("dense")).split("|") if p)
        if "wire" in kw:
            kw["wire"] = {"bf16": torch.bfloat16, "fp32": torch.float32}[kw["wire"]]
        return SimulatedLore(N, params, rank=r, start_step=start, seed=seed, **kw)
    if name.startswith("lore-"):
        return Lore(N, params, start, seed, r, variant=name[5:], **kw)
    raise ValueError(spec)
