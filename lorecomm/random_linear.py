"""Randomized linear compressors of Flynn, Johnstone & Yoo (arXiv 2411.12898).

x <- x - eta * Q^T Q g with a random Q shared through a common seed, so only
Q g is all-reduced. Per matrix, Q acts on the short side (columns of the
oriented a x b gradient, r rows of Q per column: r * b numbers, the same budget
as GreedyLore at rank r), except rand-k which samples k = r * b coordinates of
the whole matrix. Without error feedback the compressor is unbiased
(E[Q^T Q] = I: haar and rand-k scaled by a/r, Gaussian entries of variance
1/r); with error feedback it is left unscaled (E[Q^T Q] = (r/a) I).
"""

import torch

from . import ops
from .plan import Batch, BucketPlan, compressed_rank
from .probes import probe_key
from .sketches import gaussian_frame, haar_frame, random_coordinates
from .state import CommState, check_choice, check_int, check_positive

KINDS = ("randk", "haar", "gaussian")
_SKETCH_STREAM = 2


def frame(kind: str, key: int, a: int, r: int, unbiased: bool) -> torch.Tensor:
    """The a x r matrix Q^T of one matrix at one step (float64, CPU).

    Returned so that the decompressed output is ``frame @ frame^T @ H`` scaled
    as the module docstring says (the a/r of unbiased haar is folded into the
    caller's decompression).
    """
    if kind == "haar":
        return haar_frame(key, a, r)
    if kind == "gaussian":
        return gaussian_frame(key, a, r) / (r if unbiased else a) ** 0.5
    raise ValueError(kind)


class RandomLinearState(CommState):
    """State of ``random_linear_hook``: rand-k, haar-k or Gaussian (norm-k) sketches.

    Args:
        kind: "randk" | "haar" | "gaussian".
        rank: r; each compressed a x b matrix sends r * b numbers.
        error_feedback: keep the residual H - Q^T Q H and add it next step.
        start_step: dense warm-up steps.
        min_compression_rate, dense_name_patterns, seed, process_group: as
            for GreedyLoreState.
    """

    PHASES = ("dense", "compressed")

    def __init__(self, process_group=None, kind: str = "haar", rank: int = 32, error_feedback: bool = False,
                 seed: int = 0, start_step: int = 0, min_compression_rate: float = 2.0,
                 dense_name_patterns=("embed", "lm_head")):
        super().__init__(process_group, dense_name_patterns)
        self.kind = check_choice("kind", kind, KINDS)
        self.rank = check_int("rank", rank, 1)
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self.seed = check_int("seed", seed, 0)
        self.start_step = check_int("start_step", start_step, 0)
        self.min_compression_rate = check_positive("min_compression_rate", min_compression_rate)

    def config(self) -> dict:
        return {**super().config(), "kind": self.kind, "rank": self.rank, "error_feedback": self.error_feedback,
                "seed": self.seed, "start_step": self.start_step,
                "min_compression_rate": self.min_compression_rate}

    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        return None if self._is_dense_name(name) else compressed_rank(m, n, self.rank, self.min_compression_rate)

    def _batch_tensor_specs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"E": torch.zeros(batch.size, batch.a, batch.b)} if self.error_feedback else {}

    def phase(self, t: int) -> str:
        return "dense" if t <= self.start_step else "compressed"

    def _reduce_phase(self, phase: str, plan: BucketPlan, buffer: torch.Tensor) -> int:
        if phase == "dense" or not plan.batches:
            return self._all_reduce_mean(buffer)
        t = self.step + 1
        dev = buffer.device
        ok, sent = self._global_finite(buffer)
        update_error = ok & self.error_feedback
        unbiased = not self.error_feedback
        factors = sum(b.size * b.rank * b.b for b in plan.batches)
        comm = torch.empty(factors + plan.dense_numel, dtype=torch.float32, device=dev)
        work, pos = [], 0
        for batch in plan.batches:
            B, a, b, r = batch.size, batch.a, batch.b, batch.rank
            keys = [probe_key(self.seed, t, pid, _SKETCH_STREAM) for pid in batch.param_ids]
            R = comm[pos:pos + B * r * b].view(B, r, b)
            pos += R.numel()
            G = batch.view(buffer)
            E = batch.tensors.get("E")
            if self.kind == "randk":
                idx = torch.stack([random_coordinates(k, a * b, r * b) for k in keys]).to(dev)
                H = G.float() + E if E is not None else G.float()
                R.view(B, -1).copy_(H.reshape(B, -1).gather(1, idx))
                if E is not None:
                    E.copy_(torch.where(update_error, H.reshape(B, -1).scatter(1, idx, 0.0).view(B, a, b), E))
                work.append((idx, R, a / r if unbiased else 1.0))
            else:
                P = torch.stack([frame(self.kind, k, a, r, unbiased) for k in keys]).float().to(dev)
                ops.project_residual(G, E if E is not None else torch.zeros(B, a, b, device=dev), P, R,
                                     update_error)
                scale = a / r if (unbiased and self.kind == "haar") else 1.0
                work.append((P, R, scale))
        plan.gather_dense(buffer, comm[factors:])
        sent += self._all_reduce_mean(comm)
        comm[:factors].add_(torch.where(ok, 0.0, float("nan")))
        for batch, (Q, Rbar, scale) in zip(plan.batches, work):
            out = batch.view(buffer)
            if self.kind == "randk":
                full = torch.zeros(batch.size, batch.a * batch.b, device=dev)
                full.scatter_(1, Q, Rbar.reshape(batch.size, -1) * scale)
                out.copy_(full.view_as(out))
            else:
                ops.decompress(Q * scale, Rbar, out)
        plan.scatter_dense(comm[factors:], buffer)
        self._count_nonfinite(ok)
        return sent


def random_linear_hook(state: RandomLinearState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, random_linear_hook)``."""
    if not isinstance(state, RandomLinearState):
        raise TypeError(f"random_linear_hook needs a lorecomm.RandomLinearState, got {type(state).__name__}")
    return state._hook(bucket)
