"""GreedyLore: error feedback + semi-lazy SVD basis + approximate global Top-r.

The maths follows ``ALGORITHM.md`` (shared/docs) step for step; the heavy
per-matrix work goes through ``lorecomm.ops`` (the ``torch.ops.lorecomm``
library: score, project+residual, decompress), Python only plans and orders.
"""

import torch
import torch.distributed as dist

from . import ops
from .plan import Batch, BucketPlan, compressed_rank
from .probes import probe_key
from .sketches import random_columns
from .state import CommState, check_choice, check_int, check_positive

SELECTIONS = ("greedy", "fixed", "random")
PROBES = ("paper", "sketch")

#: probe_key streams
_SCORE_STREAM = 0
_SELECT_STREAM = 1


class GreedyLoreState(CommState):
    """State of the GreedyLore DDP communication hook (one per model).

    Args:
        process_group: the group to average over (None: the default group).
        rank: r, directions sent per matrix; capped at min(m, n).
        update_interval: tau, steps between basis refreshes.
        start_step: dense warm-up steps before the first refresh.
        min_compression_rate: compress an m x n gradient only if
            max(m, n) * r * min_compression_rate < m * n.
        selection: "greedy" (re-select the top-r directions every step),
            "fixed" (top-r of the last refresh, GaLore-style), "random".
        probes: "sketch" (``sketch_size`` shared probes; the default: about
            12x cheaper scores at equal or better loss, bench/results/probes.md)
            or "paper" (one probe vector per basis direction, the reference).
        sketch_size: k, probes per matrix with probes="sketch".
        error_feedback: keep what was not sent and add it next step.
        seed: seeds the probes and random selections (same on every rank).
        dense_name_patterns: parameters whose names contain (or glob-match)
            one of these stay dense.
    """

    PHASES = ("dense", "refresh", "compressed")

    def __init__(self, process_group=None, rank: int = 32, update_interval: int = 200,
                 start_step: int = 1000, min_compression_rate: float = 2.0, selection: str = "greedy",
                 probes: str = "sketch", sketch_size: int = 4, error_feedback: bool = True, seed: int = 0,
                 dense_name_patterns=("embed", "lm_head")):
        super().__init__(process_group, dense_name_patterns)
        self.rank = check_int("rank", rank, 1)
        self.update_interval = check_int("update_interval", update_interval, 1)
        self.start_step = check_int("start_step", start_step, 0)
        self.min_compression_rate = check_positive("min_compression_rate", min_compression_rate)
        self.selection = check_choice("selection", selection, SELECTIONS)
        self.probes = check_choice("probes", probes, PROBES)
        self.sketch_size = check_int("sketch_size", sketch_size, 1)
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self.seed = check_int("seed", seed, 0)
        self._basis_repairs = 0

    # ------------------------------------------------------------ the engine
    # Buckets run on the C++ engine (lorecomm._C.Engine: worker thread on CPU,
    # own stream on GPU) whenever it is built and supports the phase; the
    # Python path below is the reference and the fallback (LORECOMM_ENGINE=0).
    def reduce_async(self, buffer, params, offsets=None, is_last: bool = True) -> torch.futures.Future:
        from . import engine

        if engine.enabled(self):
            return engine.reduce_async(self, buffer, params, offsets, is_last)
        return super().reduce_async(buffer, params, offsets, is_last)

    def reduce(self, buffer, params, offsets=None, is_last: bool = True) -> torch.Tensor:
        from . import engine

        engine.drain(self)  # buckets still queued on the engine go first: same collective order
        return super().reduce(buffer, params, offsets, is_last)

    def _drain(self) -> None:
        from . import engine

        engine.drain(self)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank, "update_interval": self.update_interval,
                "start_step": self.start_step, "min_compression_rate": self.min_compression_rate,
                "selection": self.selection, "probes": self.probes, "sketch_size": self.sketch_size,
                "error_feedback": self.error_feedback, "seed": self.seed}

    # ------------------------------------------------------------- planning
    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        return None if self._is_dense_name(name) else compressed_rank(m, n, self.rank, self.min_compression_rate)

    def _batch_tensor_specs(self, batch: Batch) -> dict[str, torch.Tensor]:
        B, a, b = batch.size, batch.a, batch.b
        # U starts as the identity: a complete basis even before the first refresh
        return {"E": torch.zeros(B, a, b), "U": torch.eye(a).expand(B, a, a).clone()}

    def phase(self, t: int) -> str:
        if t <= self.start_step:
            return "dense"
        return "refresh" if (t - self.start_step - 1) % self.update_interval == 0 else "compressed"

    def _reduce_phase(self, phase: str, plan: BucketPlan, buffer: torch.Tensor) -> int:
        if phase == "dense" or not plan.batches:
            return self._all_reduce_mean(buffer)
        if phase == "refresh":
            return self._refresh(plan, buffer)
        return self._compressed(plan, buffer)

    # -------------------------------------------------------------- refresh
    def _refresh(self, plan: BucketPlan, buffer: torch.Tensor) -> int:
        """Dense all-reduce of G + E, new full basis from it, E = 0."""
        comm = buffer if buffer.dtype == torch.float32 else buffer.float()
        if self.error_feedback:
            for batch in plan.batches:
                batch.view(comm).add_(batch.tensors["E"])
        sent = self._all_reduce_mean(comm)
        ok = torch.isfinite(comm).all()  # the whole bucket: a non-finite leftover skips the update too
        for batch in plan.batches:
            U, E = batch.tensors["U"], batch.tensors["E"]
            U.copy_(torch.where(ok, self._compute_basis(batch.view(comm)), U))
            E.masked_fill_(ok, 0.0)
        self._count_nonfinite(ok)
        sent += self._ensure_identical_bases(plan.batches)
        if comm is not buffer:
            buffer.copy_(comm)
        return sent

    @staticmethod
    def _compute_basis(hbar: torch.Tensor) -> torch.Tensor:
        """Full left singular basis of each (a x b) matrix, by singular value, canonical signs
        (``torch.ops.lorecomm.refresh_basis``, the op the engine calls too)."""
        return ops.refresh_basis(hbar)

    def _ensure_identical_bases(self, batches: list[Batch]) -> int:
        """Check that every rank holds bit-identical bases; repair from rank 0 if not.

        One small MAX all-reduce of (checksum, -checksum) per matrix tells each
        rank whether any rank differs; mismatched batches are broadcast from the
        group's rank 0. Runs on refresh steps (and after loading a checkpoint).
        """
        if not batches:
            return 0
        sums = torch.cat([bitwise_checksum(b.tensors["U"]) for b in batches])
        both = torch.cat([sums, -sums])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        sent = both.numel() * both.element_size()
        n = sums.numel()
        differs = (both[:n] != -both[n:]).tolist()  # host sync, on refresh steps only
        pos = 0
        src = dist.get_global_rank(self.group, 0)
        for b in batches:
            if any(differs[pos:pos + b.size]):
                U = b.tensors["U"]
                dist.broadcast(U, src=src, group=self.group)
                sent += U.numel() * U.element_size()
                self._basis_repairs += 1
            pos += b.size
        return sent

    def check_consistency(self) -> int:
        """Verify (and repair) basis identity across ranks for every known matrix.

        A collective: call it on every rank. Returns the number of batches repaired.
        """
        self._drain()
        before = self._basis_repairs
        # counted with the refresh steps, whose check this is
        self._count_bytes("refresh", self._ensure_identical_bases([b for p in self._plans.values() for b in p.batches]))
        return self._basis_repairs - before

    # ----------------------------------------------------------- compressed
    def _keys(self, batch: Batch, t: int, stream: int, device) -> torch.Tensor:
        return torch.tensor([probe_key(self.seed, t, pid, stream) for pid in batch.param_ids],
                            dtype=torch.int64, device=device)

    def _select(self, plan: BucketPlan, buffer: torch.Tensor, dense: torch.Tensor, t: int):
        """Selected column indices J (B, r) per batch, the global finite flag, bytes sent.

        ``dense``: the bucket's dense leftovers (gathered), part of the flag.
        """
        dev = buffer.device
        if self.selection == "greedy":
            scores = []
            for batch in plan.batches:
                G, E, U = batch.view(buffer), batch.tensors["E"], batch.tensors["U"]
                keys = self._keys(batch, t, _SCORE_STREAM, dev)
                if self.probes == "paper":
                    lam = ops.score_paper(G, E, U, keys)
                else:
                    lam = ops.score_sketch(G, E, U, keys, self.sketch_size)
                scores.append(lam.reshape(-1))
            flat = torch.cat(scores)
            if dense.numel():
                # a non-finite dense leftover must skip the step too: its NaN rides in
                # the first score (x + 0.0 leaves every score as it was otherwise)
                flat[:1].add_(torch.where(torch.isfinite(dense).all(), 0.0, float("nan")))
            sent = self._all_reduce_mean(flat)  # averaged signed, squared below
            ok = torch.isfinite(flat).all()
            picks, pos = [], 0
            for batch, lam in zip(plan.batches, scores):
                lbar = flat[pos:pos + lam.numel()].view(batch.size, batch.a, -1)
                pos += lam.numel()
                energy = lbar.square().mean(-1)
                # stable descending sort: ties go to the lower index, on every rank alike
                picks.append(torch.sort(energy, dim=-1, descending=True, stable=True).indices[:, :batch.rank])
            return picks, ok, sent
        ok, sent = self._global_finite(buffer)
        return self._given_picks(plan, t, dev), ok, sent

    def _given_picks(self, plan: BucketPlan, t: int, device) -> list[torch.Tensor]:
        """(B, r) column indices per batch for the fixed / random ablations."""
        picks = []
        for batch in plan.batches:
            if self.selection == "fixed":
                J = torch.arange(batch.rank, device=device).expand(batch.size, -1)
            else:
                J = torch.stack([random_columns(probe_key(self.seed, t, pid, _SELECT_STREAM), batch.a, batch.rank)
                                 for pid in batch.param_ids]).to(device)
            picks.append(J)
        return picks

    def _compressed(self, plan: BucketPlan, buffer: torch.Tensor) -> int:
        t = self.step + 1
        factors = sum(b.size * b.rank * b.b for b in plan.batches)
        comm = torch.empty(factors + plan.dense_numel, dtype=torch.float32, device=buffer.device)
        plan.gather_dense(buffer, comm[factors:])
        picks, ok, sent = self._select(plan, buffer, comm[factors:], t)
        update_error = ok & self.error_feedback
        Ps, pos = [], 0
        for batch, J in zip(plan.batches, picks):
            U = batch.tensors["U"]
            P = U.gather(2, J.unsqueeze(1).expand(batch.size, batch.a, batch.rank))
            R = comm[pos:pos + batch.size * batch.rank * batch.b].view(batch.size, batch.rank, batch.b)
            ops.project_residual(batch.view(buffer), batch.tensors["E"], P, R, update_error)
            Ps.append((P, R))
            pos += R.numel()
        sent += self._all_reduce_mean(comm)
        # a skipped (non-finite) step must reach the optimizer as non-finite on every rank
        comm[:factors].add_(torch.where(ok, 0.0, float("nan")))
        for batch, (P, Rbar) in zip(plan.batches, Ps):
            ops.decompress(P, Rbar, batch.view(buffer))
        plan.scatter_dense(comm[factors:], buffer)
        self._count_nonfinite(ok)
        return sent

    def stats(self) -> dict:
        self._drain()  # counters and buffers the worker may still be writing
        return {**super().stats(), "basis_repairs": self._basis_repairs}

    def state_dict(self) -> dict:
        self._drain()
        return super().state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self._drain()
        super().load_state_dict(sd)


def bitwise_checksum(U: torch.Tensor) -> torch.Tensor:
    """One int64 per matrix that changes with any bit of it (wrapping arithmetic)."""
    bits = U.contiguous().view(torch.int32).reshape(U.shape[0], -1).to(torch.int64)
    weights = torch.arange(1, bits.shape[1] + 1, dtype=torch.int64, device=U.device)
    return (bits * weights).sum(-1)


def greedylore_hook(state: GreedyLoreState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, greedylore_hook)``."""
    if not isinstance(state, GreedyLoreState):
        raise TypeError(f"greedylore_hook needs a lorecomm.GreedyLoreState, got {type(state).__name__}")
    return state._hook(bucket)
