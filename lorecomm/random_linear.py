"""Randomized linear compressors of Flynn, Johnstone & Yoo (arXiv 2411.12898).

x <- x - eta * Q^T Q g with a random Q shared through a common seed, so only
Q g is all-reduced. Per matrix, Q acts on the short side (columns of the
oriented a x b gradient, r rows of Q per column: r * b numbers, the same budget
as GreedyLore at rank r), except rand-k which samples k = r * b coordinates of
the whole matrix. Without error feedback the compressor is unbiased
(E[Q^T Q] = I: haar and rand-k scaled by a/r, Gaussian entries of variance
1/r); with error feedback it is left unscaled (E[Q^T Q] = (r/a) I).
The steps run on the engine (csrc/steps/random_linear.cpp); the draws are
``lorecomm.sketches``' and ``lorecomm.simulate.SimulatedRandomLinear`` is the
float64 reference.
"""

import torch

from .plan import DEFAULT_DENSE_PATTERNS, Batch, BucketPlan, compressed_rank
from .state import CommState, check_bool, check_choice, check_int, check_positive

KINDS = ("randk", "haar", "gaussian")


class RandomLinearState(CommState):
    """State of ``random_linear_hook``: rand-k, haar-k or Gaussian (norm-k) sketches.

    Args:
        kind: "randk" | "haar" | "gaussian".
        rank: r; each compressed a x b matrix sends r * b numbers.
        error_feedback: keep the residual H - Q^T Q H and add it next step.
        start_step: dense warm-up steps.
        min_compression_rate, seed, process_group, dense_name_patterns,
            dense_embeddings, grad_scaler: as for GreedyLoreState.
    """

    PHASES = ("dense", "compressed")

    def __init__(self, process_group=None, kind: str = "haar", rank: int = 32, error_feedback: bool = False,
                 seed: int = 0, start_step: int = 0, min_compression_rate: float = 2.0,
                 dense_name_patterns=DEFAULT_DENSE_PATTERNS, dense_embeddings: bool = True, grad_scaler=None):
        super().__init__(process_group, dense_name_patterns, dense_embeddings, grad_scaler)
        self.kind = check_choice("kind", kind, KINDS)
        self.rank = check_int("rank", rank, 1)
        self.error_feedback = check_bool("error_feedback", error_feedback)
        self.seed = check_int("seed", seed, 0)
        self.start_step = check_int("start_step", start_step, 0)
        self.min_compression_rate = check_positive("min_compression_rate", min_compression_rate)

    def config(self) -> dict:
        return {**super().config(), "kind": self.kind, "rank": self.rank, "error_feedback": self.error_feedback,
                "seed": self.seed, "start_step": self.start_step,
                "min_compression_rate": self.min_compression_rate}

    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        return compressed_rank(m, n, self.rank, self.min_compression_rate)

    def _batch_tensor_specs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"E": torch.zeros(batch.size, batch.a, batch.b)} if self.error_feedback else {}

    def phase(self, t: int) -> str:
        return "dense" if t <= self.start_step else "compressed"

    def _step_for(self, phase: str, plan: BucketPlan, buffer: torch.Tensor, t: int):
        from . import _C

        if phase == "dense" or not plan.batches:
            return _C.DenseStep(buffer)
        batches = [_C.Batch(b.view(buffer), b.tensors.get("E"), b.ids, b.rank) for b in plan.batches]
        return _C.RandomLinearStep(sketch=self.kind, buffer=buffer, batches=batches,
                                   dense_ranges=list(plan.dense_ranges), error_feedback=self.error_feedback,
                                   seed=self.seed, step=t,
                                   skip_unused=self._skip_unused and self.error_feedback)  # without E nothing is owed


def random_linear_hook(state: RandomLinearState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, random_linear_hook)``."""
    if not isinstance(state, RandomLinearState):
        raise TypeError(f"random_linear_hook needs a lorecomm.RandomLinearState, got {type(state).__name__}")
    return state._hook(bucket)
