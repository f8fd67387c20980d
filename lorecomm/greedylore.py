"""GreedyLore (Chen et al., arXiv 2507.08784): error feedback + semi-lazy SVD basis
+ approximate global Top-r, as the paper states it.

The state holds the configuration and the per-matrix state (error buffer E,
full basis U); every phase runs on the engine (csrc/steps/greedylore.cpp);
``lorecomm.simulate.SimulatedGreedyLore`` is its float64 reference.
"""

import torch

from .plan import DEFAULT_DENSE_PATTERNS, Batch, BucketPlan, compressed_rank
from .state import CommState, check_bool, check_choice, check_int, check_positive

SELECTIONS = ("greedy", "fixed", "random")
PROBES = ("paper", "sketch")


class GreedyLoreState(CommState):
    """State of the GreedyLore DDP communication hook (one per model).

    Args:
        process_group: the ranks to average over (None: the default group).
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
        dense_name_patterns, dense_embeddings, grad_scaler: as ``CommState``.
    """

    PHASES = ("dense", "refresh", "compressed")

    def __init__(self, process_group=None, rank: int = 32, update_interval: int = 200,
                 start_step: int = 1000, min_compression_rate: float = 2.0, selection: str = "greedy",
                 probes: str = "sketch", sketch_size: int = 4, error_feedback: bool = True, seed: int = 0,
                 dense_name_patterns=DEFAULT_DENSE_PATTERNS, dense_embeddings: bool = True, grad_scaler=None):
        super().__init__(process_group, dense_name_patterns, dense_embeddings, grad_scaler)
        self.rank = check_int("rank", rank, 1)
        self.update_interval = check_int("update_interval", update_interval, 1)
        self.start_step = check_int("start_step", start_step, 0)
        self.min_compression_rate = check_positive("min_compression_rate", min_compression_rate)
        self.selection = check_choice("selection", selection, SELECTIONS)
        self.probes = check_choice("probes", probes, PROBES)
        self.sketch_size = check_int("sketch_size", sketch_size, 1)
        self.error_feedback = check_bool("error_feedback", error_feedback)
        self.seed = check_int("seed", seed, 0)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank, "update_interval": self.update_interval,
                "start_step": self.start_step, "min_compression_rate": self.min_compression_rate,
                "selection": self.selection, "probes": self.probes, "sketch_size": self.sketch_size,
                "error_feedback": self.error_feedback, "seed": self.seed}

    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        return compressed_rank(m, n, self.rank, self.min_compression_rate)

    def _batch_tensor_specs(self, batch: Batch) -> dict[str, torch.Tensor]:
        B, a, b = batch.size, batch.a, batch.b
        # U starts as the identity: a complete basis even before the first refresh
        return {"E": torch.zeros(B, a, b), "U": torch.eye(a).expand(B, a, a).clone()}

    def _shared_state(self) -> list[torch.Tensor]:
        return [b.tensors["U"] for p in self._plans.values() for b in p.batches]

    def phase(self, t: int) -> str:
        if t <= self.start_step:
            return "dense"
        return "refresh" if (t - self.start_step - 1) % self.update_interval == 0 else "compressed"

    def _step_for(self, phase: str, plan: BucketPlan, buffer: torch.Tensor, t: int):
        from . import _C

        if phase == "dense" or not plan.batches:
            return _C.DenseStep(buffer)
        batches = [_C.Batch(b.view(buffer), b.tensors["E"], b.ids, b.rank, U=b.tensors["U"]) for b in plan.batches]
        return _C.GreedyLoreStep(
            refresh=phase == "refresh", buffer=buffer, batches=batches, dense_ranges=list(plan.dense_ranges),
            selection=self.selection, sketch_k=self.sketch_size if self.probes == "sketch" else 0,
            error_feedback=self.error_feedback, seed=self.seed, step=t,
            skip_unused=self._skip_unused and self.error_feedback)  # without E nothing is owed


def greedylore_hook(state: GreedyLoreState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, greedylore_hook)``."""
    if not isinstance(state, GreedyLoreState):
        raise TypeError(f"greedylore_hook needs a lorecomm.GreedyLoreState, got {type(state).__name__}")
    return state._hook(bucket)
