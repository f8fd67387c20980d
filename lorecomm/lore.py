"""Lore: lorecomm's default compressor.

A warm-started range tracker (PowerSGD's power step) with error feedback,
low-precision factors whose rounding error stays in the error buffer, and one
fresh random direction per matrix on a step drawn with probability `explore`
(1/8 by default; the same draw on every rank) that makes it a contraction for
every gradient (docs/LORE.md). Two collectives per bucket (the
sketch, then the factors with the dense leftovers), no SVD, no refresh, and
state of the size of the gradient plus r x b per matrix.

The state holds the configuration and the per-matrix state (error buffer E,
warm start Q); the steps run on the engine (csrc/steps/lore.cpp);
``lorecomm.simulate.SimulatedLore`` is the float64 reference.
"""

import numbers
import time

import torch

from .plan import DEFAULT_DENSE_PATTERNS, Batch, BucketPlan, lore_rank, lore_step_bytes, matrix_shape
from .probes import coin
from .state import CommState, check_bool, check_int, check_positive, is_expanded

_WIRES = (torch.bfloat16, torch.float16, torch.float32)
_WARM_STREAM = 4
_EXPLORE_COIN = 5


class LoreState(CommState):
    """State of the Lore DDP communication hook (one per model).

    Args:
        process_group: the ranks to average over (None: the default group).
        rank: r, directions sent per matrix (capped at min(m, n); default 32); or
        compression: a target ratio (dense fp32 bytes / bytes sent per step
            after warm-up, everything counted) that sets every matrix's rank
            instead; give at most one of the two.
        explore: probability p that a step makes one of each matrix's r
            directions a fresh random one (a coin every rank flips alike): the
            compressor then contracts every gradient, whatever the tracked
            subspace, by delta = p / (a - max(r - 1, 1)) in expectation (a >= 2; 0: no
            random directions, no guarantee). At r = 1 the random direction joins
            the tracked one instead of replacing it (one more factor row on
            those steps). The default costs ~1/8 of one direction.
        wire: dtype of the sketch, factors and dense leftovers on the wire
            (bf16 default: twice the rank of fp32 at the same bytes).
        start_step: dense (fp32) warm-up steps; the last one seeds the tracker.
        min_compression_rate: compress an m x n matrix only if the bytes it sends
            (a step that does not explore), times the rate, stay below dense fp32's:
            wire_bytes (m + n) r rate < 4 m n
            (torch's PowerSGD rule on an fp32 wire).
        seed: seeds the random draws (same on every rank).
        auto_dense: after ``AUTO_DENSE_STEPS`` compressed steps, send ``AUTO_DENSE_PROBE``
            steps dense (error buffers flushed into the first; only the last
            ``AUTO_DENSE_PROBE - AUTO_DENSE_SETTLE - 1`` = 3 timed: the first ones carry the
            switch), compare the measured cost of the two kinds (CPU: training step wall time;
            CUDA: the buckets' time on the engine's stream), averaged over the ranks so every
            rank decides the same, and if compression does not pay send every bucket dense
            from then on (freeing the error buffers, zero for good), else compress again.
            ``stats()["auto_dense"]`` reports the measurement and the choice; the choice is
            saved by ``state_dict()``, and a run resumed before it times afresh.
        dense_name_patterns, dense_embeddings, grad_scaler: as ``CommState``; Lore
            compresses every matrix by default, embeddings included, as torch's
            PowerSGD does (measured: keeping the LM's embeddings dense cost more
            bytes than it bought at equal bytes, bench/results/convergence.md).
    """

    #: compressed steps timed before auto_dense decides (the first one is not counted)
    AUTO_DENSE_STEPS = 8
    #: then dense steps timed in the same steady state (the warm-up's are no baseline: first
    #: iterations, TCP ramp-up and the tracker's seeding make them slower; measured on netem)
    AUTO_DENSE_PROBE = 6
    #: of which the first ones are not counted: they carry the switch (the flush, and the link's
    #: ramp-up to dense-size transfers: on the 10 Gbit/s netem bench the probe's first two steps
    #: took up to 2x the later ones, which once made auto_dense keep compressing there)
    AUTO_DENSE_SETTLE = 2

    PHASES = ("dense", "compressed")

    def __init__(self, process_group=None, rank: int | None = None, compression: float | None = None,
                 explore: float = 0.125, wire: torch.dtype = torch.bfloat16, start_step: int = 1000,
                 min_compression_rate: float = 2.0, seed: int = 0, auto_dense: bool = True,
                 dense_name_patterns=(), dense_embeddings: bool = False, grad_scaler=None):
        super().__init__(process_group, dense_name_patterns, dense_embeddings, grad_scaler)
        if rank is not None and compression is not None:
            raise ValueError("give either rank=r (directions per matrix) or compression=c (a byte budget: dense "
                             "bytes / bytes sent), not both")
        if rank is None and compression is None:
            rank = 32
        self.rank = None if rank is None else check_int("rank", rank, 1)
        self.compression = None if compression is None else check_positive("compression", compression)
        if self.compression is not None and self.compression <= 1:
            raise ValueError(f"compression must be > 1 (dense bytes / bytes sent), got {compression!r}")
        if isinstance(explore, bool) or not isinstance(explore, numbers.Real) or not 0 <= explore <= 1:
            raise ValueError(f"explore must be a probability in [0, 1], got {explore!r}")
        self.explore = float(explore)
        if wire not in _WIRES:
            raise ValueError(f"wire must be one of torch.bfloat16, torch.float16, torch.float32; got {wire!r}")
        self.wire = wire
        self.start_step = check_int("start_step", start_step, 0)
        self.min_compression_rate = check_positive("min_compression_rate", min_compression_rate)
        self.seed = check_int("seed", seed, 0)
        self.auto_dense = check_bool("auto_dense", auto_dense)
        self._budget_ranks: dict[str, int | None] = {}
        self._timed: dict[str, list] = {}  # phase -> recent (last hand-over time, steps of its buckets)
        self._current: list = []  # steps of the optimizer step in progress
        self._decided = False
        self._dense_by_choice = False  # auto_dense decided: every bucket dense from now on
        self._auto_start = self.start_step  # auto_dense times the steps after this one
        self._probing = False  # auto_dense's dense steps have begun
        self._auto: dict = {}  # the auto_dense decision

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank, "compression": self.compression, "explore": self.explore,
                "wire": str(self.wire), "start_step": self.start_step,
                "min_compression_rate": self.min_compression_rate, "seed": self.seed, "auto_dense": self.auto_dense}

    # ------------------------------------------------------------- planning
    def bind(self, model) -> "LoreState":
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = model.module if isinstance(model, DDP) else model
        named = list(module.named_parameters() if isinstance(module, torch.nn.Module) else module)
        super().bind(model if isinstance(model, torch.nn.Module) else named)  # the DDP wrapper: its options
        if self.compression is not None:
            # what DDP sends: the trainable parameters
            self._budget_ranks = self._ranks_for_budget([(n, p) for n, p in named if p.requires_grad])
        return self

    def _ranks_for_budget(self, trainable) -> dict[str, int | None]:
        """Per-matrix ranks for ``compression``: the largest common compression
        factor s (each a x b matrix gets r = a b / (s (a + b)) directions) whose
        bytes after warm-up (sketch, factors, dense leftovers on the wire) fit
        the budget; a function of the shapes alone, so every rank agrees."""
        wb = self._wire_bytes
        named = {name: tuple(p.shape) for name, p in trainable}
        dense_names = {name for name, p in trainable if id(p) in self._dense_params or self._is_dense_name(name)}
        total = sum(torch.Size(s).numel() for s in named.values())
        budget = 4 * total / self.compression

        def ranks_at(s: float) -> dict[str, int | None]:
            out = {}
            for name, shape in named.items():
                mn = matrix_shape(shape)
                if mn is None or name in dense_names:
                    out[name] = None
                    continue
                a, b = min(mn), max(mn)
                want = max(1, int(a * b / (s * (a + b))))
                out[name] = lore_rank(mn[0], mn[1], want, self.min_compression_rate, wb)
            return out

        def cost(ranks) -> int:
            return lore_step_bytes(((shape, ranks[name]) for name, shape in named.items()), wb, self._skip_unused,
                                   explore=self.explore > 0)

        lo, hi = 1.0, 1e6  # compression factor per matrix: cost decreases as s grows
        if cost(ranks_at(hi)) > budget:
            raise ValueError(
                f"compression={self.compression:g} cannot be reached on this model: even at rank 1 per "
                f"matrix it sends {cost(ranks_at(hi)):.0f} bytes per step against a budget of "
                f"{budget:.0f} (dense leftovers alone: {sum(wb * torch.Size(named[n]).numel() for n in dense_names):.0f});"
                f" ask for less compression or compress more matrices (dense_name_patterns, dense_embeddings)")
        for _ in range(60):
            mid = (lo * hi) ** 0.5
            if cost(ranks_at(mid)) > budget:
                lo = mid
            else:
                hi = mid
        return ranks_at(hi)

    @property
    def _wire_bytes(self) -> int:
        return torch.tensor([], dtype=self.wire).element_size()

    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        r = self.rank if self.compression is None else self._budget_ranks.get(name)
        # the budget's rank is the whole matrix's: a shard (FSDP2) caps it again and may not pay
        return None if r is None else lore_rank(m, n, r, self.min_compression_rate, self._wire_bytes)

    def _batch_tensor_specs(self, batch: Batch) -> dict[str, torch.Tensor]:
        from . import ops

        B, a, b, r = batch.size, batch.a, batch.b, batch.rank
        # the first warm start before any gradient was seen: a shared Gaussian Q
        keys = torch.ops.lorecomm.probe_keys(torch.tensor(batch.param_ids), self.seed, 0, _WARM_STREAM)
        return {"E": torch.zeros(B, a, b), "Q": ops.probe_normal(keys, r, b)}

    def _shared_state(self) -> list[torch.Tensor]:
        return [b.tensors["Q"] for p in self._plans.values() for b in p.batches]

    # --------------------------------------------------------------- phases
    def phase(self, t: int) -> str:
        probe = self._auto_start + self.AUTO_DENSE_STEPS + 1  # auto_dense's dense steps start here
        if t <= self.start_step or self._dense_by_choice or (self.auto_dense and not self._decided and
                                                             probe <= t < probe + self.AUTO_DENSE_PROBE):
            return "dense"
        return "compressed"

    def _step_for(self, phase: str, plan: BucketPlan, buffer: torch.Tensor, t: int):
        from . import _C

        batches = [_C.Batch(b.view(buffer), b.tensors["E"], b.ids, b.rank, Q=b.tensors["Q"]) for b in plan.batches]
        if phase == "dense":
            if t == self.start_step and batches:
                return _C.LoreWarmupStep(buffer=buffer, batches=batches, seed=self.seed, step=t)
            if t > self.start_step:  # auto_dense's probe (time dense steps from now on) or its choice
                if not self._probing and not self._decided:
                    self._probing = True
                    self._timed.pop("dense", None)  # the warm-up's timings are no baseline
                return self._dense_flushed(plan, buffer, batches)
            return _C.DenseStep(buffer)
        if self.auto_dense and not self._decided and \
                t >= self._auto_start + self.AUTO_DENSE_STEPS + 1 + self.AUTO_DENSE_PROBE:
            self._decide_dense(buffer.device)
        if self._dense_by_choice:
            return self._dense_flushed(plan, buffer, batches)
        if not batches:
            return _C.DenseStep(buffer, wire=self.wire)
        explore = 1 if coin(self.seed, t, _EXPLORE_COIN, self.explore) else 0
        return _C.LoreStep(buffer=buffer, batches=batches, dense_ranges=list(plan.dense_ranges), wire=self.wire,
                           explore=explore, seed=self.seed, step=t, skip_unused=self._skip_unused)

    # ------------------------------------------------------------ auto_dense
    def _dense_flushed(self, plan: BucketPlan, buffer: torch.Tensor, batches):
        """A dense step of a compressed bucket: the first one also sends what the compressor
        still owed (the error buffers, then zero), again on the next if it was skipped as
        non-finite or a matrix no rank used kept its E (DDP would drop it); later ones find
        them zero."""
        from . import _C

        if not batches:  # nothing compressed in this bucket: nothing owed
            return _C.DenseStep(buffer)
        owed = getattr(plan, "owed", True)  # True, False, or the last flush (owed if it was skipped)
        if isinstance(owed, _C.DenseStep):  # completed: the optimizer step that submitted it is over
            # non-finite, a matrix no rank used whose E is not zero on some rank, or the step failed
            # (never ran: E untouched): send what is left
            owed = owed.owes is None or bool(owed.owes)
        if owed:
            plan.owed = _C.DenseStep(buffer, flush=batches, skip_unused=self._skip_unused)
            return plan.owed
        plan.owed = False
        if self._dense_by_choice:
            self._release_error_buffers(plan)
        return _C.DenseStep(buffer)

    def _release_error_buffers(self, plan: BucketPlan) -> None:
        """Dense by choice with nothing owed: E is zero and stays zero, so its memory (the size of
        the gradient) goes back; a zero-stride view of one zero stands in for every reader."""
        for batch in plan.batches:
            E = batch.tensors["E"]
            if E.numel() > 1 and not is_expanded(E):
                self._replace_E(batch, E.new_zeros(()).expand(E.shape))

    def _replace_E(self, batch: Batch, E: torch.Tensor) -> None:
        """A batch's error buffers, and the per-parameter views of them, become ``E``."""
        batch.tensors["E"] = E
        for i, slot in enumerate(batch.slots):
            self._slot_tensors[slot.param_id]["E"] = E[i]

    def _make_writable(self) -> None:
        """Real (zero) error buffers again where they were released: a checkpoint is written into
        them. The plans' first, then any parameter's kept outside a plan (bound again since)."""
        for plan in self._plans.values():
            for batch in plan.batches:
                if is_expanded(batch.tensors["E"]):
                    self._replace_E(batch, torch.zeros_like(batch.tensors["E"]))
        for ts in self._slot_tensors.values():
            if "E" in ts and is_expanded(ts["E"]):
                ts["E"] = torch.zeros_like(ts["E"])

    def _submitted(self, plan: BucketPlan, phase: str, step, is_last: bool) -> None:
        if not self.auto_dense or self._decided:
            return
        self._current.append(step)
        if is_last:
            self._step_ended(phase)

    def _step_ended(self, phase: str) -> None:
        """One optimizer step: its buckets' steps, and when its last bucket was handed over (or,
        with ``end_step()``, when the step ended)."""
        if not self.auto_dense or self._decided:
            return
        kept = self._timed.setdefault(phase, [])
        kept.append((time.monotonic(), self._current))
        del kept[:-(self.AUTO_DENSE_STEPS + 1)]
        self._current = []

    def _step_seconds(self, phase: str) -> list[float]:
        """The cost of each recent step of ``phase``: on CPU the wall time between the hand-overs of
        consecutive last buckets (the whole training step: the compressor competes with the
        backward pass for the same cores); on CUDA the buckets' time on the engine's stream."""
        kept = self._timed.get(phase, [])
        if kept and kept[-1][1] and kept[-1][1][0].buffer.is_cuda:
            costs = [sum(s.elapsed_seconds() for s in steps) for _, steps in kept[1:]]
        else:
            costs = [b[0] - a[0] for a, b in zip(kept, kept[1:])]
        return costs[self.AUTO_DENSE_SETTLE:] if phase == "dense" else costs

    def _decide_dense(self, device) -> None:
        """Every rank goes dense from now on if the compressed steps cost more than the probe's
        dense steps; the costs are averaged over the ranks (one small all-reduce, once), so
        all decide alike."""
        from . import _C

        self._drain("reduce")
        dense, comp = self._step_seconds("dense"), self._step_seconds("compressed")
        if len(dense) < 2 or len(comp) < 2:
            self._decided, self._timed, self._current = True, {}, []
            return  # too few timed steps of a kind to compare: keep compressing

        def median(xs):
            return sorted(xs)[len(xs) // 2]

        local = torch.tensor([median(comp), median(dense)], device=device)
        step = _C.DenseStep(local)
        step.label = f"auto_dense timings (step {self.step + 1})"
        # if this collective fails nothing is decided: after every rank's reset_all() the next step
        # decides again, on the same timings
        self._runtime().engine.submit(step).wait()
        self._decided, self._timed, self._current = True, {}, []
        with self._counter_lock:
            self._bytes_sent += step.bytes_sent
            self._bytes_by_phase["compressed"] += step.bytes_sent  # part of compressing: deciding whether to
            self._collectives += step.collectives
        c, d = local.cpu().tolist()  # the one host read: the decision
        self._auto = {"compressed_step_s": c, "dense_step_s": d, "dense_from_now": c > d}
        self._dense_by_choice = c > d  # the probe flushed E already: it stays zero going dense

    def state_dict(self) -> dict:
        return {**super().state_dict(), "auto_dense": {"decided": self._decided, "measured": dict(self._auto)}}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        saved = sd.get("auto_dense", {"decided": False, "measured": {}})
        self._decided, self._auto = saved["decided"], dict(saved["measured"])
        self._dense_by_choice = bool(self._auto.get("dense_from_now", False))
        self._timed, self._current, self._probing = {}, [], False
        for plan in self._plans.values():  # loaded into a used state: E is the checkpoint's, maybe owed
            plan.owed = True
        # not decided yet: the timings did not survive, so time afresh from the resumed step
        # (every rank resumed the same step: load_state_dict checked it)
        self._auto_start = self.start_step if self._decided else max(self.start_step, self.step)

    def stats(self) -> dict:
        st = super().stats()
        st["auto_dense"] = dict(self._auto)
        return st

    def ranks(self) -> dict[str, int]:
        """The rank of every compressed matrix (by parameter name): as planned in the buckets seen
        so far, else (``compression=``, before the first backward) as the budget gives it."""
        planned = {s.name: b.rank for p in self._plans.values() for b in p.batches for s in b.slots}
        budget = {n: r for n, r in self._budget_ranks.items() if r is not None}
        return {**budget, **planned}


def lore_hook(state: LoreState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, lore_hook)``."""
    if not isinstance(state, LoreState):
        raise TypeError(f"lore_hook needs a lorecomm.LoreState, got {type(state).__name__}")
    return state._hook(bucket)

