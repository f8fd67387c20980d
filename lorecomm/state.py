"""What every lorecomm communication state shares.

A state owns the configuration, the step counter, the parameter identities,
the per-bucket plans with their state tensors, the stats and the checkpoints;
no maths. Per bucket it builds the engine step of its compressor
(``_step_for``: a ``lorecomm._C`` step object) and submits it to the engine it
shares with every lorecomm state on the same ranks (``lorecomm.engine``); the
engine runs it and reports what it sent. The DDP hook and every integration
reach a state through ``reduce`` / ``reduce_async`` (one bucket at a time,
same buckets in the same order on every rank).
"""
from __future__ import annotations

import gc
import numbers
import threading
import warnings
import weakref
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from . import engine as _engine
from .plan import DEFAULT_DENSE_PATTERNS, BucketPlan, build_plan, name_is_dense


def check_int(name: str, value: Any, low: int) -> int:
    # any integral type (int, numpy integers), not bool
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a sequence of strings, e.g. ('embed', 'lm_head'); got {value!r}")
    return tuple(value)


def _elem_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_expanded(t: torch.Tensor) -> bool:
    """A zero-stride view of one element (state memory given back: Lore's E once dense by choice)."""
    return t.numel() > 1 and 0 in t.stride()


def _held_bytes(t: torch.Tensor) -> int:
    """The memory a state tensor holds: an expanded one, one element."""
    return t.element_size() if is_expanded(t) else _elem_bytes(t)


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of ``t`` (those of size > 1) from outermost to innermost in memory: DDP lays
    a gradient out in its bucket in its parameter's memory order."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    return tuple(sorted(dims, key=lambda d: (-t.stride(d), d)))


def state_misfit(name: str, saved: dict, now: dict, made, layout) -> tuple[str | None, dict]:
    """Whether a parameter's saved state (tensor shapes ``saved``, made in memory order ``made``) fits
    its slot now (``now``, ``layout``): the memory-order mismatch said, or None, and the tensors whose
    shapes differ, {key: (saved, now)} (orders unknown on either side are not compared)."""
    order = None
    if made is not None and layout is not None and tuple(made) != tuple(layout):
        order = (f"{name}'s gradient lies in the bucket in memory order {tuple(layout)}, but its state was made in "
                 f"order {tuple(made)} (e.g. a conv weight in channels_last on one side only)")
    misfit = {k: (tuple(saved[k]), tuple(now[k])) for k in now if k in saved and tuple(saved[k]) != tuple(now[k])}
    return order, misfit


def _shapes_text(misfit: dict) -> str:
    return ", ".join(f"{k} {a} vs {b}" for k, (a, b) in misfit.items())


def checkpoint_refusal(name: str, order: str | None, misfit: dict) -> str:
    """Why a checkpoint's state of ``name`` cannot be used, and the fix."""
    if order:
        return f"{order}: convert the model to the memory format of the checkpoint (model.to(memory_format=...)) first"
    return (f"the checkpoint's state of {name} does not fit its shape now (saved vs now: {_shapes_text(misfit)}): "
            f"it was saved from a model where {name} had another shape")


def embedding_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters of the embedding tables, and of the output head when it has a
    table's shape (an untied LM head): the module's ``get_output_embeddings()`` (Hugging Face),
    else its last ``nn.Linear``. A tied head is the table's own parameter; other Linear layers of a
    table's shape (an MLP projection as wide as a positional table) stay compressed."""
    tables = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    found = {id(w) for w in tables}
    shapes = {tuple(w.shape) for w in tables}
    head = None
    if callable(getattr(module, "get_output_embeddings", None)):
        try:
            head = module.get_output_embeddings()
        except NotImplementedError:
            head = None
    if head is None:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        head = linears[-1] if linears else None
    if isinstance(head, torch.nn.Linear) and tuple(head.weight.shape) in shapes:
        found.add(id(head.weight))
    return found


class CommState:
    """Base of the states: identity, step counter, stats, plans, checkpoints.

    Args:
        process_group: the ranks to average over (None: the default group). The
            engine communicates on a private group over the same ranks.
        dense_name_patterns: parameters whose names contain (or glob-match)
            one of these stay dense.
        dense_embeddings: keep embedding tables (``nn.Embedding``,
            ``nn.EmbeddingBag``) and an output head of a table's shape dense
            (``embedding_parameters``); needs ``bind`` to get a module.
        grad_scaler: the ``torch.amp.GradScaler`` that scales this model's loss,
            if any: buckets are compressed in unscaled units, so error buffers
            never mix loss scales.
    """

    #: phase names, in the order the stats report them
    PHASES: tuple[str, ...] = ("dense",)

    def __init__(self, process_group=None, dense_name_patterns=DEFAULT_DENSE_PATTERNS, dense_embeddings: bool = True,
                 grad_scaler=None):
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"process_group must be a torch.distributed.ProcessGroup or None (the default group); "
                f"got {type(process_group).__name__}")
        if grad_scaler is not None and not hasattr(grad_scaler, "get_scale"):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler (or None), got {type(grad_scaler).__name__}")
        self.process_group = process_group
        self.dense_name_patterns = check_patterns("dense_name_patterns", dense_name_patterns)
        self.dense_embeddings = check_bool("dense_embeddings", dense_embeddings)
        self.grad_scaler = grad_scaler
        self.step = 0  # completed optimizer steps; the current one-based step is step + 1
        self._model_ref: weakref.ref | None = None
        self._params: dict[int, tuple[int, str]] = {}  # id(param) -> (param_id, name)
        self._dense_params: set[int] = set()  # id(param) of embedding tables / heads
        # DDP with find_unused_parameters / static_graph drops the output of a parameter no rank used:
        # with error feedback such a matrix then sends nothing and keeps what it owes (E) for when it
        # is used again (set by bind(ddp); read by the compressors' steps)
        self._skip_unused = False
        self._rt: _engine.Runtime | None = None
        self._plans: dict[tuple, BucketPlan] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # loaded, not yet placed
        self._slot_tensors: dict[int, dict[str, torch.Tensor]] = {}  # param_id -> views into batches
        self._slot_names: dict[int, str] = {}
        # memory order of each parameter's gradient in the bucket when its state was made: E and Q
        # hold the matrix in that order (e.g. a channels_last conv weight's columns are (h, w, in))
        self._layouts: dict[str, tuple[int, ...]] = {}
        self._calls = 0
        self._bytes_sent = 0
        self._bytes_dense = 0
        self._collectives = 0
        self._bytes_by_phase = {p: 0 for p in self.PHASES}
        self._steps_by_phase = {p: 0 for p in self.PHASES}
        self._nonfinite = None  # device counter of steps with a skipped (non-finite) bucket
        self._step_bad = None   # device flag: a bucket of the current step was non-finite
        self._repairs = 0
        self._counter_lock = threading.Lock()  # completions count from the engine's worker thread

    # ----------------------------------------------------------------- identity
    @property
    def group(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
                "before the first training step")
        return self.process_group if self.process_group is not None else dist.group.WORLD

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def bind(self, model) -> "CommState":
        """Record stable parameter identities (index and name) of ``model``.

        ``model``: a module (DDP-wrapped or not) or an iterable of (name, param)
        (then ``dense_embeddings`` finds nothing: only ``dense_name_patterns`` apply).
        Parameter ids are positions in ``named_parameters()`` order, which is
        the same on every rank and across restarts of the same model code.
        With torch.distributed initialized this also joins (collectively) the
        engine of the state's ranks.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP drops the output of a parameter no rank used: the used flags must ride (set below)
        skip_unused = (bool(model.find_unused_parameters or getattr(model, "static_graph", False))
                       if isinstance(model, DDP) else self._skip_unused)
        if isinstance(model, torch.nn.Module):
            module = model.module if isinstance(model, DDP) else model
            owner = module  # a new DDP wrapper of the same module (Lightning's next fit) is the same model
            named = list(module.named_parameters())
            dense = embedding_parameters(module) if self.dense_embeddings else set()
        else:
            owner = None
            named = list(model)
            dense = set()
        if self._model_ref is not None:
            bound = self._model_ref()
            if bound is not None and bound is not owner:
                raise RuntimeError(
                    "this lorecomm state is already bound to another model; create one state per model "
                    "(its error buffers and bases belong to that model's parameters)")
            if bound is None and self._params and owner is not None:
                raise RuntimeError("this lorecomm state's model was deleted; create a new state")
        # a checkpoint loaded before binding must fit this model: checked before anything changes,
        # so a refused bind leaves the state bound as it was
        self._check_known(self._pending, [name for name, _ in named])
        if owner is not None:
            self._model_ref = weakref.ref(owner)
        self._skip_unused = skip_unused
        self._params = {id(p): (i, name) for i, (name, p) in enumerate(named)}
        self._dense_params = dense
        self._plans.clear()
        self._rekey_by_name({name: i for i, (name, _) in enumerate(named)})
        if dist.is_available() and dist.is_initialized():
            self._runtime()
        return self

    def _rekey_by_name(self, ids: dict[str, int]) -> None:
        """Bound anew (parameters replaced, or added before others): the state each parameter
        already has follows its name to its new position; that of names gone is dropped, said."""
        kept, names, gone = {}, {}, []
        for pid, ts in self._slot_tensors.items():
            name = self._slot_names[pid]
            if name in ids:
                kept[ids[name]], names[ids[name]] = ts, name
            else:
                gone.append(name)
        if gone:
            warnings.warn(f"lorecomm: the model bound now has no parameter {', '.join(sorted(gone)[:5])}"
                          f"{' ...' if len(gone) > 5 else ''}: their compressor state (error buffers) is dropped",
                          stacklevel=3)
        self._slot_tensors, self._slot_names = kept, names

    def _identity(self, param: torch.Tensor) -> tuple[int, str]:
        try:
            return self._params[id(param)]
        except KeyError:
            raise RuntimeError(
                "a gradient in this bucket belongs to a parameter the state does not know: the state is "
                "bound to a different model (use one state per model), or the model's parameters were "
                "replaced after binding (call state.bind(model) again)") from None

    def _bind_from_ddp_bucket(self, bucket) -> None:
        """First hook call without ``lorecomm.register``: find the DDP model once."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        params = bucket.parameters()
        probe = params[0]
        for obj in gc.get_objects():
            if isinstance(obj, DDP) and any(p is probe for p in obj.module.parameters()):
                self.bind(obj)
                return
        raise RuntimeError(
            "lorecomm hooks must be registered on a torch.nn.parallel.DistributedDataParallel model "
            "(ddp_model.register_comm_hook(state, hook)) or use lorecomm.register(ddp_model)")

    # ------------------------------------------------------------------ engine
    def _runtime(self) -> _engine.Runtime:
        """This state's engine (shared with every state on the same ranks), joined on first use."""
        if self._rt is None or self._rt.engine.stopped:
            self._rt = _engine.runtime_for(self.group)
        return self._rt

    def _drain(self, caller: str) -> None:
        """Wait for every bucket of the engine; refuses to wait from the engine's own thread."""
        if self._rt is None:
            return
        eng = self._rt.engine
        if eng.on_worker_thread():
            raise RuntimeError(
                f"{type(self).__name__}.{caller}() was called from a callback of a lorecomm future, on the "
                f"engine's worker thread: it would wait for the worker itself. Call it after the future "
                f"completed (e.g. after backward() returned)")
        eng.drain()

    # -------------------------------------------------------------------- plans
    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        """Rank to compress an m x n gradient with, or None for dense."""
        return None

    def _plan(self, buffer: torch.Tensor, params: Sequence[torch.Tensor], offsets, shapes=None) -> BucketPlan:
        """The bucket's plan (checked input; built once per bucket layout). ``shapes``: each
        gradient's shape in the bucket when it is not its parameter's (a shard, under FSDP)."""
        if not isinstance(buffer, torch.Tensor) or buffer.dim() != 1 or not buffer.is_contiguous():
            what = (f"a {'non-contiguous ' if not buffer.is_contiguous() else ''}{buffer.dim()}-D tensor"
                    if isinstance(buffer, torch.Tensor) else type(buffer).__name__)
            raise ValueError(f"buffer must be a contiguous 1-D gradient tensor, got {what}: pass the flat "
                             f"bucket (e.g. bucket.buffer()) or tensor.reshape(-1)")
        if buffer.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"buffer dtype must be float32, bfloat16 or float16, got {buffer.dtype}")
        if not self._params:
            raise RuntimeError("state is not bound to a model: call state.bind(model) or lorecomm.register(...)")
        if offsets is None:
            offsets, pos = [], 0
            for p in params:
                offsets.append(pos)
                pos += p.numel()
        if len(offsets) != len(params):
            raise ValueError(f"got {len(params)} params but {len(offsets)} offsets")
        shapes = [tuple(p.shape) for p in params] if shapes is None else [tuple(s) for s in shapes]
        if len(shapes) != len(params):
            raise ValueError(f"got {len(params)} params but {len(shapes)} shapes")
        ids = [self._identity(p) for p in params]
        key = (buffer.numel(), buffer.dtype, buffer.device,
               tuple((pid, int(o), s) for (pid, _), o, s in zip(ids, offsets, shapes)))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._new_plan(key, buffer, params, ids, offsets, shapes)
        return plan

    def _new_plan(self, key, buffer, params, ids, offsets, shapes) -> BucketPlan:
        self._check_device(buffer)
        dense_ids = {pid for p, (pid, _) in zip(params, ids) if id(p) in self._dense_params}

        def rank_for(m: int, n: int, name: str, pid: int) -> int | None:
            if pid in dense_ids or name_is_dense(name, self.dense_name_patterns):
                return None
            return self._rank_for(m, n, name)

        described = [(pid, name, shape, int(o)) for (pid, name), shape, o in zip(ids, shapes, offsets)]
        plan = build_plan(buffer.numel(), described, rank_for)
        # buckets in flight finish first: their state moves into the new plan, and the
        # agreement check below talks on the engine's group from this thread
        self._drain("reduce")
        # a parameter belongs to one bucket: plans of a superseded layout go (with their state)
        pids = {pid for pid, _ in ids}
        for k in [k for k, p in self._plans.items() if pids & set(p.param_ids)]:
            del self._plans[k]
        # (a shard handed over with shapes= is a flat piece: no memory order of its own)
        layouts = {name: memory_order(p) for p, (_, name), shape in zip(params, ids, shapes) if tuple(p.shape) == shape}
        self._init_plan_state(plan, buffer.device, layouts)
        self._agree("bucket plan", self._plan_fingerprint(plan, buffer, described))
        self._plans[key] = plan
        return plan

    def _check_device(self, buffer: torch.Tensor) -> None:
        if buffer.device.type != "cuda":
            return
        from . import _C, ops

        if not _C.ENGINE_CUDA:
            raise RuntimeError(
                "this lorecomm build has no CUDA engine (lorecomm._C was built without CUDA), but the bucket is "
                f"on {buffer.device}: rebuild lorecomm on a machine with a CUDA toolkit and a CUDA build of torch")
        if ops.BACKEND.get("cuda") != "triton":
            raise RuntimeError(
                f"the bucket is on {buffer.device} but lorecomm's CUDA kernels are not registered (they are the "
                f"Triton kernels of lorecomm.kernels): install triton (pip install triton) and import lorecomm again")

    def _batch_tensor_specs(self, batch) -> dict[str, torch.Tensor]:
        """Fresh batched state tensors of one batch, e.g. {"E": zeros (B, a, b)}."""
        return {}

    def _make_writable(self) -> None:
        """Before a checkpoint is written into the state tensors: memory given back is allocated again."""

    def _init_plan_state(self, plan: BucketPlan, device: torch.device, layouts: dict) -> None:
        """Allocate the plan's batched state; carry over each parameter's state.

        DDP rebuilds its buckets after the first iteration and a checkpoint may
        be loaded before any bucket is seen: per-parameter state (keyed by the
        stable parameter id, saved by name) moves into the new batches, if it was made for
        the shape and memory order (``layouts``) the gradient has now. Everything is checked
        before anything changes: a checkpoint that does not fit raises, and stays pending.
        """
        fresh = [{k: t.to(device) for k, t in self._batch_tensor_specs(batch).items()} for batch in plan.batches]
        placed = []
        for batch, tensors in zip(plan.batches, fresh):
            for i, slot in enumerate(batch.slots):
                prev = self._slot_tensors.get(slot.param_id)
                loaded = prev is None
                if loaded:
                    prev = self._pending.get(slot.name)
                keep = [] if prev is None else self._fitting(slot.name, prev, tensors, layouts.get(slot.name), loaded)
                placed.append((batch, i, slot, prev, keep, loaded))
        for batch, tensors in zip(plan.batches, fresh):
            batch.ids = torch.tensor(batch.param_ids, dtype=torch.int64, device=device)
            batch.tensors = tensors
        for batch, i, slot, prev, keep, loaded in placed:
            if loaded and prev is not None:
                del self._pending[slot.name]
            for k in keep:
                batch.tensors[k][i].copy_(prev[k])
            if slot.name in layouts:
                self._layouts[slot.name] = layouts[slot.name]
            self._slot_tensors[slot.param_id] = {k: t[i] for k, t in batch.tensors.items()}
            self._slot_names[slot.param_id] = slot.name

    def _fitting(self, name: str, prev: dict, tensors: dict, layout, loaded: bool) -> list[str]:
        """The state tensors of ``prev`` that fit the new slot. A checkpoint's that do not fit raise;
        a carried state (a rebind) restarts what does not fit, said."""
        order, misfit = state_misfit(name, {k: v.shape for k, v in prev.items()},
                                     {k: t.shape[1:] for k, t in tensors.items()}, self._layouts.get(name), layout)
        if loaded and (order or misfit):
            raise ValueError(checkpoint_refusal(name, order, misfit))
        if order:
            warnings.warn(f"lorecomm: {order}: it starts afresh", stacklevel=3)
            return []
        if misfit:
            warnings.warn(f"lorecomm: the state of {name} no longer fits ({_shapes_text(misfit)}: its shape or rank "
                          f"changed): {', '.join(misfit)} starts afresh", stacklevel=3)
        return [k for k in tensors if k not in misfit]

    def _is_dense_name(self, name: str) -> bool:
        return name_is_dense(name, self.dense_name_patterns)

    # --------------------------------------------------------- rank agreement
    def _plan_fingerprint(self, plan: BucketPlan, buffer: torch.Tensor, described) -> dict:
        ranks = {s.name: b.rank for b in plan.batches for s in b.slots}
        return {
            "kind": type(self).__name__,
            "config": self.config(),
            "step": self.step,
            "bucket": f"{buffer.numel()} {str(buffer.dtype).replace('torch.', '')} elements",
            "compressed": [f"{name} {'x'.join(map(str, shape))} r={ranks[name]}"
                           for _, name, shape, _ in described if name in ranks],
            # every rank must send the used flags, or none (the size of a collective)
            "skips unused parameters": self._skip_unused,
        }

    def _agree(self, what: str, mine: dict) -> None:
        """Every rank compares ``mine`` with the others' (one small collective on the
        engine's group); a difference raises ValueError on every rank, naming it."""
        rt = self._runtime()
        n = dist.get_world_size(rt.group)
        if n == 1:
            return
        self._drain("reduce")
        theirs: list = [None] * n
        dist.all_gather_object(theirs, mine, group=rt.group)
        diffs = []
        for k in mine:
            vals = [t.get(k) for t in theirs]
            if any(v != vals[0] for v in vals):
                if isinstance(vals[0], dict) and all(isinstance(v, dict) for v in vals):
                    for sub in sorted({s for v in vals for s in v}):
                        sv = [v.get(sub) for v in vals]
                        if any(x != sv[0] for x in sv):
                            diffs.append(f"{sub}: " + ", ".join(f"{x!r} on rank {r}" for r, x in enumerate(sv)))
                else:
                    diffs.append(f"{k}: " + ", ".join(f"{x!r} on rank {r}" for r, x in enumerate(vals)))
        if diffs:
            raise ValueError(
                f"lorecomm: the ranks disagree on the {what} ({type(self).__name__}); every rank must run the "
                f"same configuration on the same model and buckets. Differences: " + "; ".join(diffs))

    # ------------------------------------------------------------ entry points
    def reduce(self, buffer: torch.Tensor, params: Sequence[torch.Tensor], offsets=None,
               is_last: bool = True, shapes=None) -> torch.Tensor:
        """Average ``buffer`` (local gradients of ``params``) across ranks, in place."""
        return self.reduce_async(buffer, params, offsets, is_last, shapes).wait()

    def reduce_async(self, buffer, params, offsets=None, is_last: bool = True, shapes=None) -> torch.futures.Future:
        """``reduce`` without waiting: a future of ``buffer``, completed by the engine."""
        plan = self._plan(buffer, params, offsets, shapes)
        t = self.step + 1
        phase = self.phase(t)
        step = self._step_for(phase, plan, buffer, t)
        step.label = f"bucket {self._calls} (step {t}, {buffer.numel()} elements)"
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale = getattr(self.grad_scaler, "_scale", None)  # the device tensor: no host sync
            if scale is not None:
                step.loss_scale = scale.to(buffer.device).reshape(())
        with self._counter_lock:
            self._calls += 1
            self._bytes_dense += _elem_bytes(buffer)
            if is_last:
                self._steps_by_phase[phase] += 1
                self.step += 1
        self._submitted(plan, phase, step, is_last)
        fut = self._runtime().engine.submit(step)

        # runs where the step completed (the worker, in bucket order), before DDP sees the bucket
        def finish(f, step=step, phase=phase, is_last=is_last):
            value = f.value()  # re-raises the engine's error
            with self._counter_lock:
                self._bytes_sent += step.bytes_sent
                self._bytes_by_phase[phase] += step.bytes_sent
                self._collectives += step.collectives
                self._repairs += sum(getattr(step, "repairs", ()))
            ok = getattr(step, "ok", None)
            if ok is not None:
                bad = ~ok
                self._step_bad = bad if self._step_bad is None else self._step_bad | bad
            if is_last:
                self._count_step_nonfinite()
            return value

        return fut.then(finish)

    def _count_step_nonfinite(self) -> None:
        """The step ended: count it if one of its buckets was non-finite (on device)."""
        if self._step_bad is not None:
            bad, self._step_bad = self._step_bad.to(torch.int64), None
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite.to(bad.device) + bad

    def end_step(self) -> None:
        """End the optimizer step after buckets all reduced with ``is_last=False``: for stacks that
        know only after their last bucket that the step is over (what ``is_last=True`` does)."""
        self._drain("end_step")
        phase = self.phase(self.step + 1)
        with self._counter_lock:
            self._steps_by_phase[phase] += 1
            self.step += 1
        self._step_ended(phase)
        self._count_step_nonfinite()

    def _step_ended(self, phase: str) -> None:
        """An optimizer step ended (its last bucket handed over, or ``end_step()``)."""

    def _hook(self, bucket) -> torch.futures.Future:
        if not isinstance(bucket, dist.GradBucket):
            raise TypeError(
                f"lorecomm hooks are DDP communication hooks: expected a torch.distributed.GradBucket, "
                f"got {type(bucket).__name__}")
        if not self._params:
            self._bind_from_ddp_bucket(bucket)
        buffer = bucket.buffer()
        esize = buffer.element_size()
        base = buffer.data_ptr()
        offsets = [(g.data_ptr() - base) // esize for g in bucket.gradients()]
        return self.reduce_async(buffer, bucket.parameters(), offsets, bucket.is_last())

    # ---------------------------------------------------------------- phases
    def phase(self, t: int) -> str:
        """Phase of one-based step ``t``."""
        return "dense"

    def _step_for(self, phase: str, plan: BucketPlan, buffer: torch.Tensor, t: int):
        """The engine step that runs this bucket in ``phase`` at one-based step ``t``."""
        from . import _C

        return _C.DenseStep(buffer)

    def _submitted(self, plan: BucketPlan, phase: str, step, is_last: bool) -> None:
        """A bucket's step is about to go to the engine (states that time their steps keep it)."""

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Counters since construction (or as restored by load_state_dict)."""
        self._drain("stats")
        steps = self.step
        return {
            "steps": steps,
            "calls": self._calls,
            "bytes_sent": self._bytes_sent,
            "bytes_dense": self._bytes_dense,
            "collectives": self._collectives,
            "repairs": self._repairs,
            "compression_ratio": self._bytes_dense / self._bytes_sent if self._bytes_sent else 1.0,
            "bytes_per_step": self._bytes_sent / steps if steps else 0.0,
            "bytes_by_phase": dict(self._bytes_by_phase),
            "steps_by_phase": dict(self._steps_by_phase),
            "nonfinite_steps": int(self._nonfinite.sum().item()) if self._nonfinite is not None else 0,
            "compressed_matrices": len({s.param_id for p in self._plans.values() for s in p.matrices}),
            "state_bytes": sum(_held_bytes(t) for p in self._plans.values() for b in p.batches
                               for t in b.tensors.values()),
        }

    # ------------------------------------------------------------- checkpoint
    def config(self) -> dict:
        """The constructor arguments that define the maths (checked on load and across ranks)."""
        return {"dense_name_patterns": list(self.dense_name_patterns), "dense_embeddings": self.dense_embeddings}

    def _param_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter state tensors, keyed by parameter name."""
        return {self._slot_names[pid]: ts for pid, ts in self._slot_tensors.items()}

    def state_dict(self) -> dict:
        """This rank's state (error buffers are rank-local: save one file per rank)."""
        self._drain("state_dict")
        params = {name: {k: v.detach().cpu().clone() for k, v in ts.items()}
                  for name, ts in self._param_tensors().items()}
        for name, ts in self._pending.items():  # loaded but not placed yet: keep them
            params.setdefault(name, {k: v.clone() for k, v in ts.items()})
        return {
            "format": 2,
            "kind": type(self).__name__,
            "config": self.config(),
            "world_size": self.world_size,
            "rank": self._group_rank(),
            "step": self.step,
            "counters": {
                "calls": self._calls, "bytes_sent": self._bytes_sent, "bytes_dense": self._bytes_dense,
                "collectives": self._collectives, "repairs": self._repairs,
                "bytes_by_phase": dict(self._bytes_by_phase), "steps_by_phase": dict(self._steps_by_phase),
                "nonfinite_steps": self.stats()["nonfinite_steps"],
            },
            "params": params,
            "layouts": {name: list(order) for name, order in self._layouts.items() if name in params},
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore ``state_dict()``; a collective (the ranks check together that each loads its own
        file of the same configuration at the same step, and all raise if one cannot load)."""
        self._drain("load_state_dict")
        problem = self._load_problem(sd)
        d = sd if isinstance(sd, dict) else {}
        saved_by = d.get("rank")  # absent from files written before lorecomm saved it
        whose = "its own" if saved_by in (None, self._group_rank()) else f"rank {saved_by}'s"
        # checked together on every rank (a rank that raised alone would leave the others waiting)
        self._agree("checkpoint", {"kind": d.get("kind"), "config": d.get("config"), "step": d.get("step"),
                                   "file": f"{whose} (error buffers are per rank: load each rank's own file)",
                                   "problem": problem})
        if problem:
            raise ValueError(problem)
        self._make_writable()
        self.step = sd["step"]
        c = sd["counters"]
        self._calls, self._bytes_sent, self._bytes_dense = c["calls"], c["bytes_sent"], c["bytes_dense"]
        self._collectives, self._repairs = c.get("collectives", 0), c.get("repairs", 0)
        self._bytes_by_phase = dict(c["bytes_by_phase"])
        self._steps_by_phase = dict(c["steps_by_phase"])
        self._nonfinite = torch.tensor(c["nonfinite_steps"]) if c["nonfinite_steps"] else None
        placed = self._param_tensors()
        self._pending = {}
        # the loaded state was made in the checkpoint's memory orders (files before lorecomm saved them: unknown)
        self._layouts.update({name: tuple(order) for name, order in sd.get("layouts", {}).items()})
        for name, ts in sd["params"].items():
            if name in placed:
                for k, v in ts.items():
                    placed[name][k].copy_(v)
            else:
                self._pending[name] = ts
        # state this rank has but the file has not (saved before those parameters' first bucket, e.g. a
        # rollback to step 0): back to what a new state starts from, not kept from the run being undone
        for plan in self._plans.values():
            for batch in plan.batches:
                missing = [i for i, slot in enumerate(batch.slots) if slot.name not in sd["params"]]
                if missing:
                    fresh = self._batch_tensor_specs(batch)
                    for k, t in batch.tensors.items():
                        t[missing] = fresh[k][missing].to(t.device)

    def _load_problem(self, sd) -> str | None:
        """Why this rank cannot load ``sd``, or None (never raises: every rank must reach the agreement)."""
        if not isinstance(sd, dict):
            return f"state_dict must be the dict a lorecomm state's state_dict() returned, got {type(sd).__name__}"
        missing = [k for k in ("kind", "world_size", "config", "params", "step", "counters") if k not in sd]
        if missing:
            return f"state_dict lacks {', '.join(missing)}: it is not a lorecomm state's state_dict()"
        try:
            return self._unfit(sd)
        except Exception as e:  # noqa: BLE001  (a malformed file: said on every rank, not raised on one)
            return f"state_dict could not be read ({e!r}): it is not a lorecomm state's state_dict()"

    def _unfit(self, sd: dict) -> str | None:
        if sd.get("kind") != type(self).__name__:
            return f"state_dict was saved by {sd.get('kind')}, cannot load into {type(self).__name__}"
        if sd["world_size"] != self.world_size:
            return (f"state_dict was saved with world size {sd['world_size']} but the process group now has "
                    f"{self.world_size} ranks: error buffers are per rank, so resume with the same world size "
                    f"(or start a new state)")
        if sd["config"] != self.config():
            diff = {k: (sd["config"].get(k), v) for k, v in self.config().items() if sd["config"].get(k) != v}
            return (f"state_dict config differs from this state's (saved, current): {diff}; build the "
                    f"state with the saved configuration (state_dict()['config']) to resume from it")
        try:
            self._check_known(sd["params"])  # unbound: checked when bound
        except ValueError as e:
            return str(e)
        placed = self._param_tensors()  # the rest are checked where they are placed
        saved_orders = sd.get("layouts", {})
        for name in sorted(set(sd["params"]) & set(placed)):
            made = tuple(saved_orders[name]) if name in saved_orders else None
            order, misfit = state_misfit(name, {k: v.shape for k, v in sd["params"][name].items()},
                                         {k: t.shape for k, t in placed[name].items()}, made, self._layouts.get(name))
            if order or misfit:
                return checkpoint_refusal(name, order, misfit)
        return None

    def _group_rank(self) -> int:
        return dist.get_rank(self.process_group) if dist.is_available() and dist.is_initialized() else 0

    def _check_known(self, saved_names, model_names=None) -> None:
        """Every saved parameter must exist in the model (``model_names``, default the bound one's),
        or its state would silently vanish."""
        known = set(model_names) if model_names is not None else {name for _, name in self._params.values()}
        if not known:
            return
        unknown = sorted(set(saved_names) - known)
        if unknown:
            raise ValueError(
                f"state_dict holds state for {len(unknown)} parameter(s) this model does not have "
                f"(e.g. {', '.join(unknown[:3])}; the model's are e.g. {', '.join(sorted(known)[:3])}): it was "
                f"saved from a different model, or under other parameter names (a wrapper's prefix?)")

    # ------------------------------------------------------------ consistency
    def _shared_state(self) -> list[torch.Tensor]:
        """The batched tensors that must be bit-identical on every rank."""
        return []

    def check_consistency(self) -> int:
        """Checksum every shared state tensor (GreedyLore's bases, Lore's warm-start
        factors) across ranks and repair any that differ by a broadcast from the
        group's rank 0. A collective: call it on every rank. Returns the number of
        batches repaired (also counted in ``stats()["repairs"]``)."""
        from . import _C

        shared = self._shared_state()
        dev = shared[0].device if shared else torch.device("cpu")
        step = _C.ConsistencyStep(torch.zeros(0, device=dev), shared)
        step.label = f"consistency check (after step {self.step})"
        self._runtime().engine.submit(step).wait()
        with self._counter_lock:
            self._bytes_sent += step.bytes_sent
            self._collectives += step.collectives
            self._repairs += sum(step.repairs)
        return sum(step.repairs)


def bitwise_checksum(U: torch.Tensor) -> torch.Tensor:
    """One int64 per matrix that changes with any bit of it (wrapping arithmetic;
    the engine's checksum, csrc/steps/greedylore.cpp)."""
    bits = U.contiguous().view(torch.int32).reshape(U.shape[0], -1).to(torch.int64)
    weights = torch.arange(1, bits.shape[1] + 1, dtype=torch.int64, device=U.device)
    return (bits * weights).sum(-1)
