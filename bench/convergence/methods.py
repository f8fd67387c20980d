"""Gradient-communication methods installed on a DDP model, with byte accounting.

Every method reports cumulative bytes this rank put into collectives after each optimizer
step (``Method.bytes_sent()``), so dense, torch PowerSGD and lorecomm are counted alike:

- ``dense``: plain DDP all-reduce (no hook); bytes = 4 * numel per step (fp32).
- ``powersgd``: torch's own ``powerSGD_hook`` run unmodified. On Gloo it only works with ONE
  DDP bucket (it launches a collective from a Future callback; with two or more buckets Gloo
  aborts with "Received data size doesn't match expected size"), so every run in this
  package builds DDP with ``bucket_cap_mb`` larger than the model (one bucket for all
  methods, same conditions). torch does not count bytes; we mirror its rule: on steps
  < ``start_powerSGD_iter`` the whole bucket (4 * numel); afterwards, for each gradient viewed
  as ``shape[0] x rest``, (m + n) * r' * 4 bytes if torch compresses it
  (m * n > (m + n) * r' * min_compression_rate, r' = min(m, n, r)) else 4 * numel.
- ``lore``: lorecomm's default compressor (``lorecomm.register(ddp, rank=...)``) at rank
  ``lore_rank`` (default ``lore_rank_within`` PowerSGD's bytes at ``rank``: about twice ``rank``, since its
  factors are bf16),
  every matrix compressed as PowerSGD does (no dense embeddings); bytes from ``state.stats()``.
- ``greedylore`` / ``greedy-fixed`` / ``greedy-random`` / ``greedy-noef``: ``lorecomm.register``
  with selection greedy / fixed / random, or error feedback off; bytes from ``state.stats()``.
- ``randk`` / ``haar`` / ``gaussian``: ``lorecomm.RandomLinearState`` (arXiv 2411.12898),
  without error feedback (unbiased scaling), as in that paper.
"""
from __future__ import annotations

import inspect

import torch

DENSE = "dense"
POWERSGD = "powersgd"
LORE = "lore"
GREEDY = {"greedylore": dict(selection="greedy"),
          "greedy-fixed": dict(selection="fixed"),
          "greedy-random": dict(selection="random"),
          "greedy-noef": dict(selection="greedy", error_feedback=False),
          "greedy-sketch": dict(selection="greedy", probes="sketch")}
RANDOM_LINEAR = {"randk": "randk", "haar": "haar", "gaussian": "gaussian"}
ALL_METHODS = [DENSE, POWERSGD, LORE, *GREEDY, *RANDOM_LINEAR]


def single_bucket_mb(model) -> float:
    """A ``bucket_cap_mb`` that puts the whole model in one DDP bucket."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return nbytes / 2**20 * 2 + 1


def powersgd_step_bytes(params, rank: int, min_compression_rate: float = 2.0) -> int:
    total = 0
    for p in params:
        m = p.shape[0] if p.dim() > 0 else 1
        n = p.numel() // m
        r = min(m, n, rank)
        if m * n > (m + n) * r * min_compression_rate:
            total += (m + n) * r * 4
        else:
            total += p.numel() * 4
    return total


def lore_step_bytes(params, rank: int, min_compression_rate: float = 2.0, wire_bytes: int = 2,
                    explore: bool = True) -> int:
    """The most bytes Lore (``lorecomm.LoreState(rank=rank)``, bf16 wire) sends in a compressed step:
    each matrix at the rank lorecomm's planning rule gives it (``lore_rank``), counted by lorecomm's
    own ``lore_step_bytes``, the rule ``compression=`` budgets with (``explore``: the state's
    explore > 0, the default, so a rank-1 matrix's exploring steps count their extra factor row)."""
    from lorecomm.plan import lore_rank, lore_step_bytes as step_bytes, matrix_shape
    ranks = []
    for p in params:
        mn = matrix_shape(tuple(p.shape))
        ranks.append((tuple(p.shape), lore_rank(*mn, rank, min_compression_rate, wire_bytes) if mn else None))
    return step_bytes(ranks, wire_bytes, explore=explore)


def lore_rank_within(params, budget: int, **kw) -> int:
    """The largest Lore rank whose bytes per step (``lore_step_bytes``) fit in ``budget``: Lore at a
    PowerSGD run's bytes (about twice its rank: bf16 factors; more where torch's rule sends a matrix
    dense in fp32 that Lore sends in bf16). Stops where a higher rank sends no more (every matrix
    capped or dense)."""
    r, sent = 1, lore_step_bytes(params, 1, **kw)
    if sent > budget:
        raise ValueError(f"even rank 1 sends {sent} bytes, over the budget {budget}")
    while r < 4096:
        more = lore_step_bytes(params, r + 1, **kw)
        if more > budget or more <= sent:
            break
        r, sent = r + 1, more
    return r


class Method:
    def __init__(self, name, ddp, cfg):
        self.name = name
        self.cfg = cfg
        self.params = [p for p in ddp.parameters() if p.requires_grad]
        self.dense_step = sum(p.numel() * 4 for p in self.params)
        self.steps = 0
        self._cum = 0
        self.state = None
        self.note = ""
        r = cfg.get("rank", 8)
        start = cfg.get("start_step", 0)
        if name == DENSE:
            self.note = "plain DDP all-reduce (fp32)"
        elif name == POWERSGD:
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as P
            start_p = max(2, start)  # torch requires >= 2 with EF / warm start
            self.state = P.PowerSGDState(process_group=None, matrix_approximation_rank=r,
                                         start_powerSGD_iter=start_p, use_error_feedback=True,
                                         warm_start=True, random_seed=cfg.get("seed", 0))
            ddp.register_comm_hook(self.state, P.powerSGD_hook)
            self._psgd_start = start_p
            self._psgd_bytes = powersgd_step_bytes(self.params, r)
            self.note = f"torch powerSGD_hook r={r}, start_powerSGD_iter={start_p}, single DDP bucket"
        elif name == LORE:
            import lorecomm
            # auto_dense off: these runs compare quality at equal bytes (on loopback dense is faster)
            default_explore = inspect.signature(lorecomm.LoreState).parameters["explore"].default
            explores = cfg.get("explore", default_explore) > 0  # a rank-1 exploring step sends a row more
            kw = dict(rank=cfg.get("lore_rank") or lore_rank_within(self.params, powersgd_step_bytes(self.params, r),
                                                                    explore=explores),
                      start_step=start, seed=cfg.get("seed", 0),
                      auto_dense=False)
            for k in ("min_compression_rate", "explore"):
                if k in cfg:
                    kw[k] = cfg[k]
            if "wire" in cfg:  # a dtype name, e.g. "float32" (JSON-safe in the raw results)
                kw["wire"] = getattr(torch, cfg["wire"])
            self.state = lorecomm.register(ddp, state=lorecomm.LoreState(process_group=ddp.process_group, **kw))
            self.note = ", ".join(f"{k}={v}" for k, v in kw.items())
        elif name in GREEDY:
            import lorecomm
            kw = dict(rank=r, update_interval=cfg.get("update_interval", 50), start_step=start,
                      seed=cfg.get("seed", 0), error_feedback=True)
            for k in ("probes", "min_compression_rate", "dense_name_patterns"):
                if k in cfg:
                    kw[k] = cfg[k]
            kw.update(GREEDY[name])
            self.state = lorecomm.register(ddp, state=lorecomm.GreedyLoreState(process_group=ddp.process_group, **kw))
            self.note = ", ".join(f"{k}={v}" for k, v in kw.items())
        elif name in RANDOM_LINEAR:
            import lorecomm
            kw = dict(kind=RANDOM_LINEAR[name], rank=r, error_feedback=cfg.get("rl_error_feedback", False),
                      seed=cfg.get("seed", 0))
            kw["start_step"] = start
            for k in ("min_compression_rate", "dense_name_patterns"):
                if k in cfg:
                    kw[k] = cfg[k]
            st = lorecomm.RandomLinearState(**kw)
            self.state = lorecomm.register(ddp, state=st)
            self.note = ", ".join(f"{k}={v}" for k, v in kw.items())
        else:
            raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")

    def after_step(self) -> int:
        """Call once after each optimizer step; returns cumulative bytes sent by this rank."""
        self.steps += 1
        if self.name == DENSE:
            self._cum += self.dense_step
        elif self.name == POWERSGD:
            self._cum += self.dense_step if self.steps <= self._psgd_start else self._psgd_bytes
        else:
            self._cum = int(self.state.stats()["bytes_sent"])
        return self._cum

    def dense_bytes(self) -> int:
        return self.dense_step * self.steps
