"""Single-process simulation of N ranks, in float64: the reference.

A direct reading of the algorithms (Lore: docs/LORE.md; GreedyLore: the paper,
Chen et al. arXiv 2507.08784; the baselines: their papers), one matrix at a
time, with explicit loops over ranks and no shared code with the runtime's
maths; only the random draws (probes, random indices, frames:
``lorecomm.sketches``) are shared, so both see the same randomness. The tests hold the runtime on real Gloo ranks against it,
and the convergence benchmarks use it for world sizes a 2-core machine cannot
run as processes.

    sim = SimulatedLore(world_size=4, params=[("w", (64, 32)), ("b", (64,))], rank=4)
    avg = sim.step(grads)   # grads[i][p]: rank i's gradient of parameter p
"""
from __future__ import annotations

from typing import Sequence

import torch

from .plan import DEFAULT_DENSE_PATTERNS, compressed_rank, lore_rank, matrix_shape, name_is_dense
from .probes import coin, probe_key, probe_matrix
from .sketches import gaussian_frame, haar_frame, random_indices

F64 = torch.float64


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """Householder QR's Q with the signs fixed by R's diagonal (the engine's convention; it runs
    the QR in float32 on its float32 sketches)."""
    q, r = torch.linalg.qr(Y)
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)


def _on_wire(x: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    """x rounded to the wire dtype (kept in float64)."""
    return x if wire == F64 else x.to(wire).to(F64)


def _mean_on_wire(xs: list[torch.Tensor], wire: torch.dtype) -> torch.Tensor:
    """What every rank holds after a sum all-reduce of x_i / N in the wire dtype."""
    return _on_wire(sum(_on_wire(x / len(xs), wire) for x in xs), wire)


class _Simulated:
    def __init__(self, world_size: int, params: Sequence[tuple[str, Sequence[int]]], rank: int,
                 min_compression_rate: float, dense_name_patterns: Sequence[str], seed: int, error_feedback: bool,
                 start_step: int, skip_unused: bool = False):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.N = world_size
        self.params = [(name, tuple(shape)) for name, shape in params]
        self.rank, self.seed, self.error_feedback, self.start_step = rank, seed, error_feedback, start_step
        # as a state bound to DDP(find_unused_parameters=True): with error feedback, a compressed matrix
        # whose gradient is exactly 0 on every rank (DDP drops its output) sends 0 and keeps its state
        self.skip_unused = skip_unused
        self._unused: set[int] = set()  # this step's such matrices
        self.t = 0
        self.ranks: list[int | None] = []  # per parameter: r, or None for dense
        for name, shape in self.params:
            mn = matrix_shape(shape)
            r = None
            if mn is not None and not name_is_dense(name, dense_name_patterns):
                r = self._compressed_rank(mn[0], mn[1], rank, min_compression_rate)
            self.ranks.append(r)
        self.E = [[self._zeros(p) for p in range(len(self.params))] for _ in range(self.N)]
        self.bytes_sent = 0  # per rank, as the runtime counts them (scores, factors, dense)

    def _oriented(self, p: int, g: torch.Tensor) -> torch.Tensor:
        m, n = matrix_shape(self.params[p][1])
        x = g.reshape(m, n).double()
        return x.t() if m > n else x

    def _unoriented(self, p: int, x: torch.Tensor) -> torch.Tensor:
        m, n = matrix_shape(self.params[p][1])
        return (x.t() if m > n else x).reshape(self.params[p][1])

    @staticmethod
    def _compressed_rank(m: int, n: int, rank: int, rate: float) -> int | None:
        return compressed_rank(m, n, rank, rate)

    def _zeros(self, p: int):
        mn = matrix_shape(self.params[p][1])
        if self.ranks and self.ranks[p] is not None:
            return torch.zeros(min(mn), max(mn), dtype=F64)
        return None

    def compressed_params(self) -> list[int]:
        return [p for p, r in enumerate(self.ranks) if r is not None]

    def step(self, grads: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        if len(grads) != self.N:
            raise ValueError(f"expected gradients of {self.N} ranks, got {len(grads)}")
        self.t += 1
        self._unused = set()
        if self.skip_unused and self.error_feedback and not self._dense_step():
            # one used flag per compressed matrix on the wire
            self._unused = {p for p in self.compressed_params()
                            if all(not bool(torch.any(grads[i][p] != 0)) for i in range(self.N))}
            self.bytes_sent += self._flag_bytes * len(self.compressed_params())
        if not self._dense_step() and self.compressed_params():  # no compressed matrix: a dense step
            self.bytes_sent += self._step_flag_bytes()
        out = []
        for p, (name, shape) in enumerate(self.params):
            gs = [grads[i][p].double() for i in range(self.N)]
            if self.ranks[p] is None or self._dense_step():
                out.append(self._dense(p, gs))
            else:
                hs = [self._oriented(p, g) + (self.E[i][p] if self.error_feedback else 0) for i, g in enumerate(gs)]
                out.append(self._unoriented(p, self._matrix_step(p, hs)))
        return out

    def _dense(self, p: int, gs: list[torch.Tensor]) -> torch.Tensor:
        self.bytes_sent += 4 * gs[0].numel()
        return sum(gs) / self.N

    _flag_bytes = 4  # a used flag rides in a float32 collective

    def _step_flag_bytes(self) -> int:
        """Bytes a compressed step sends once (the simulation is one bucket), beside its matrices."""
        return 0

    def _dense_step(self) -> bool:
        return self.t <= self.start_step

    def _matrix_step(self, p: int, hs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class SimulatedLore(_Simulated):
    """N simulated ranks of Lore, lorecomm's default compressor (same arguments as LoreState).

    Per oriented a x b matrix at rank r, on a step that explores (a shared coin
    with probability ``explore``) k = 1 random direction replaces the weakest
    of the r tracked ones, or joins the one tracked at r = 1 (k = 0 otherwise,
    or where all a are tracked): t = max(r - k, 1) tracked, Y_i = H_i Q[:t]^T,
    Ybar averaged on the wire, V = orth([Ybar, W]) with W the step's shared
    Gaussian a x k, R_i = V^T H_i rounded to the wire dtype, E_i = H_i - V R_i,
    Rbar averaged on the wire, output V Rbar, Q = Rbar's r rows of most energy
    by decreasing norm. The last
    warm-up step initialises Q from the averaged gradient (a randomized range
    finder); compressed steps send the dense leftovers on the wire too.
    """

    def __init__(self, world_size: int, params, rank: int = 32, start_step: int = 1000,
                 min_compression_rate: float = 2.0, explore: float = 0.125, wire: torch.dtype = torch.bfloat16,
                 seed: int = 0, dense_name_patterns=(), skip_unused: bool = False):
        self.explore = explore
        self.wire = F64 if wire == torch.float64 else wire
        super().__init__(world_size, params, rank, min_compression_rate, dense_name_patterns, seed, True, start_step,
                         skip_unused)
        self.Q: dict[int, torch.Tensor] = {}
        for p in self.compressed_params():
            a, b = self._zeros(p).shape
            self.Q[p] = probe_matrix(probe_key(seed, 0, p, 4), self.ranks[p], b).double()

    def _compressed_rank(self, m: int, n: int, rank: int, rate: float) -> int | None:
        return lore_rank(m, n, rank, rate, self._wire_bytes)

    @property
    def _wire_bytes(self) -> int:
        return torch.tensor([], dtype=self.wire).element_size()

    @property
    def _flag_bytes(self) -> int:  # the used flags ride after the sketches, in the wire dtype
        return self._wire_bytes

    def _dense(self, p: int, gs: list[torch.Tensor]) -> torch.Tensor:
        if self._dense_step():
            mean = sum(gs) / self.N
            self.bytes_sent += 4 * gs[0].numel()
            if self.t == self.start_step and self.ranks[p] is not None:
                self._warm_start(p, self._oriented(p, mean))
            return mean
        self.bytes_sent += self._wire_bytes * gs[0].numel()
        return _mean_on_wire([g.double() for g in gs], self.wire)

    def _warm_start(self, p: int, gbar: torch.Tensor) -> None:
        """Q from the averaged gradient of the last warm-up step (every rank holds it)."""
        r = self.ranks[p]
        V = _orthonormal(gbar @ probe_matrix(probe_key(self.seed, self.t, p, 4), gbar.shape[1], r).double())
        self.Q[p] = self._by_energy(V.t() @ gbar)

    @staticmethod
    def _by_energy(R: torch.Tensor) -> torch.Tensor:
        order = sorted(range(R.shape[0]), key=lambda j: (-float(R[j].square().sum()), j))
        return R[order]

    def _matrix_step(self, p: int, hs: list[torch.Tensor]) -> torch.Tensor:
        a, b = hs[0].shape
        r = self.ranks[p]
        explore = 1 if coin(self.seed, self.t, 5, self.explore) else 0
        t = max(r - explore, 1)  # at least one tracked direction: at r = 1 the random one joins it
        k = min(explore, a - t)
        wire = self.wire
        Ybar = _mean_on_wire([h @ self.Q[p][:t].t() for h in hs], wire)
        cols = [Ybar]
        if k:
            cols.append(probe_matrix(probe_key(self.seed, self.t, p, 3), a, k).double())
        V = _orthonormal(torch.cat(cols, 1))
        self.bytes_sent += self._wire_bytes * (a * t + (t + k) * b)
        if p in self._unused:  # sends R = 0; E and Q stay for when it is used again
            return torch.zeros(a, b, dtype=F64)
        Rs = [_on_wire(V.t() @ h, wire) for h in hs]
        for i in range(self.N):
            self.E[i][p] = hs[i] - V @ Rs[i]
        Rbar = _mean_on_wire(Rs, wire)
        self.Q[p] = self._by_energy(Rbar)[:r]
        return V @ Rbar


class SimulatedGreedyLore(_Simulated):
    """N simulated ranks of GreedyLore (same arguments as GreedyLoreState)."""

    def __init__(self, world_size: int, params, rank: int = 32, update_interval: int = 200, start_step: int = 1000,
                 min_compression_rate: float = 2.0, selection: str = "greedy", probes: str = "sketch",
                 sketch_size: int = 4, error_feedback: bool = True, seed: int = 0,
                 dense_name_patterns=DEFAULT_DENSE_PATTERNS, skip_unused: bool = False):
        super().__init__(world_size, params, rank, min_compression_rate, dense_name_patterns, seed, error_feedback,
                         start_step, skip_unused)
        self.tau = update_interval
        self.selection, self.probes, self.k = selection, probes, sketch_size
        self.U: dict[int, torch.Tensor] = {
            p: torch.eye(self._zeros(p).shape[0], dtype=F64) for p in self.compressed_params()}

    def _refresh_step(self) -> bool:
        return (self.t - self.start_step - 1) % self.tau == 0

    def _step_flag_bytes(self) -> int:
        # a given selection (fixed, random) sends the one-float finite flag before the factors
        return 4 if self.selection != "greedy" and not self._refresh_step() else 0

    def _matrix_step(self, p: int, hs: list[torch.Tensor]) -> torch.Tensor:
        a, b = hs[0].shape
        r = self.ranks[p]
        N = self.N
        if self._refresh_step():  # refresh: the semi-lazy SVD
            # the dense all-reduce, then the basis checksum pair (two int64) of every matrix
            self.bytes_sent += 4 * a * b + 16
            if p in self._unused:  # sends G = 0 (dropped by DDP); E and U stay for when it is used again
                return torch.zeros(a, b, dtype=F64)
            hbar = sum(hs) / N
            self.U[p] = torch.linalg.svd(hbar, full_matrices=True).U
            for i in range(N):
                self.E[i][p].zero_()
            return hbar
        U = self.U[p]
        if self.selection == "greedy":
            key = probe_key(self.seed, self.t, p, 0)
            if self.probes == "paper":
                V = probe_matrix(key, a, b).double()
                lam = sum(((U.t() @ h) * V).sum(1) for h in hs) / N
                energy = lam ** 2
                self.bytes_sent += 4 * a
            else:
                S = probe_matrix(key, b, self.k).double()
                lam = sum(U.t() @ (h @ S) for h in hs) / N
                energy = (lam ** 2).mean(1)
                self.bytes_sent += 4 * a * self.k
            # the r largest energies, ties to the lower index
            J = sorted(range(a), key=lambda j: (-float(energy[j]), j))[:r]
            J = torch.tensor(J)
        elif self.selection == "fixed":
            J = torch.arange(r)
        else:
            J = random_indices(probe_key(self.seed, self.t, p, 1), a, r)
        self.bytes_sent += 4 * r * b
        if p in self._unused:  # sends R = 0; E stays for when it is used again
            return torch.zeros(a, b, dtype=F64)
        P = U[:, J]
        Rs = [P.t() @ h for h in hs]
        if self.error_feedback:
            for i in range(N):
                self.E[i][p] = hs[i] - P @ Rs[i]
        return P @ (sum(Rs) / N)


def random_frame(kind: str, key: int, a: int, r: int, unbiased: bool) -> torch.Tensor:
    """The a x r frame of a randomized linear compressor at one step (float64), scaled
    as the engine scales it: haar orthonormal, gaussian entries of variance 1/r
    (unbiased) or 1/a (with error feedback)."""
    if kind == "haar":
        return haar_frame(key, a, r)
    if kind == "gaussian":
        return gaussian_frame(key, a, r) / (r if unbiased else a) ** 0.5
    raise ValueError(kind)


class SimulatedRandomLinear(_Simulated):
    """N simulated ranks of the randomized linear compressors (as RandomLinearState)."""

    def __init__(self, world_size: int, params, kind: str = "haar", rank: int = 32, error_feedback: bool = False,
                 seed: int = 0, start_step: int = 0, min_compression_rate: float = 2.0,
                 dense_name_patterns=DEFAULT_DENSE_PATTERNS, skip_unused: bool = False):
        super().__init__(world_size, params, rank, min_compression_rate, dense_name_patterns, seed, error_feedback,
                         start_step, skip_unused)
        from .random_linear import KINDS
        from .state import check_choice

        self.kind = check_choice("kind", kind, KINDS)

    def _step_flag_bytes(self) -> int:
        return 4  # the one-float finite flag before the factors

    def _matrix_step(self, p: int, hs: list[torch.Tensor]) -> torch.Tensor:
        a, b = hs[0].shape
        r = self.ranks[p]
        N = self.N
        unbiased = not self.error_feedback
        key = probe_key(self.seed, self.t, p, 2)
        self.bytes_sent += 4 * r * b
        if p in self._unused:  # sends 0; E stays for when it is used again
            return torch.zeros(a, b, dtype=F64)
        if self.kind == "randk":
            idx = random_indices(key, a * b, r * b)
            mask = torch.zeros(a * b, dtype=F64)
            mask[idx] = 1.0
            mask = mask.view(a, b)
            sent = [h * mask for h in hs]
            scale = a / r if unbiased else 1.0
        else:
            Q = random_frame(self.kind, key, a, r, unbiased).float().double()  # float32, as the runtime's
            sent = [Q @ (Q.t() @ h) for h in hs]
            scale = a / r if (unbiased and self.kind == "haar") else 1.0
        if self.error_feedback:
            for i in range(N):
                self.E[i][p] = hs[i] - sent[i]
        return scale * sum(sent) / N


class SimulatedPowerSGD(_Simulated):
    """N simulated ranks of PowerSGD (Vogels et al.), as torch's ``powerSGD_hook`` runs it.

    Per matrix (viewed as shape[0] x rest, like torch's hook): M_i = G_i + E_i,
    P = mean(M_i Q), orthonormalised, Q = mean(M_i^T P), output P Q^T,
    E_i = M_i - P Q^T; Q is warm-started from the previous step. Matrices
    where (m + n) * r * min_compression_rate >= m * n stay dense, as in torch.
    The baseline for the simulated studies; the real hook runs on real ranks.
    """

    def __init__(self, world_size: int, params, rank: int = 32, start_step: int = 0,
                 min_compression_rate: float = 2.0, error_feedback: bool = True, seed: int = 0,
                 dense_name_patterns=()):
        super().__init__(world_size, params, rank, min_compression_rate, dense_name_patterns, seed, error_feedback,
                         start_step)
        g = torch.Generator().manual_seed(seed)
        self.Q = {p: torch.randn(matrix_shape(self.params[p][1])[1], r, generator=g, dtype=F64)
                  for p, r in enumerate(self.ranks) if r is not None}

    @staticmethod
    def _compressed_rank(m: int, n: int, rank: int, rate: float) -> int | None:
        # torch's rule (not GreedyLore's): compress where (m + n) * r * rate < m * n
        r = min(rank, m, n)
        return r if (m + n) * r * rate < m * n else None

    def _zeros(self, p: int):
        # PowerSGD works on the m x n view as is: unoriented error buffers
        mn = matrix_shape(self.params[p][1])
        return torch.zeros(*mn, dtype=F64) if self.ranks and self.ranks[p] is not None else None

    # PowerSGD works on the m x n view as is (no orientation)
    def _oriented(self, p: int, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(matrix_shape(self.params[p][1])).double()

    def _unoriented(self, p: int, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.params[p][1])

    def _matrix_step(self, p: int, ms: list[torch.Tensor]) -> torch.Tensor:
        P = torch.linalg.qr(sum(m @ self.Q[p] for m in ms) / self.N).Q
        Q = sum(m.t() @ P for m in ms) / self.N
        self.Q[p] = Q
        approx = P @ Q.t()
        if self.error_feedback:
            for i in range(self.N):
                self.E[i][p] = ms[i] - approx
        self.bytes_sent += 4 * sum(approx.shape) * self.ranks[p]
        return approx
