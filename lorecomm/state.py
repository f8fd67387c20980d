"""What every lorecomm communication state shares.

A state owns the step counter, the byte accounting, the parameter identities
and the per-bucket plans; subclasses implement ``_reduce_phase``: the maths of
one bucket in one phase. The DDP hook and every integration reach a state
through ``reduce`` / ``reduce_async`` (one bucket at a time, same buckets in the
same order on every rank).
"""
from __future__ import annotations

import gc
import numbers
import threading
import weakref
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .plan import BucketPlan, build_plan, name_is_dense


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


def check_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a sequence of strings, e.g. ('embed', 'lm_head'); got {value!r}")
    return tuple(value)


def _elem_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommState:
    """Base of the states: identity, step counter, stats, plans, checkpoints."""

    #: phase names, in the order the stats report them
    PHASES: tuple[str, ...] = ("dense",)

    def __init__(self, process_group=None, dense_name_patterns=("embed", "lm_head")):
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"process_group must be a torch.distributed.ProcessGroup or None (the default group); "
                f"got {type(process_group).__name__}")
        self.process_group = process_group
        self.dense_name_patterns = check_patterns("dense_name_patterns", dense_name_patterns)
        self.step = 0  # completed optimizer steps; the current one-based step is step + 1
        self._model_ref: weakref.ref | None = None
        self._params: dict[int, tuple[int, str]] = {}  # id(param) -> (param_id, name)
        self._plans: dict[tuple, BucketPlan] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # loaded, not yet placed
        self._slot_tensors: dict[int, dict[str, torch.Tensor]] = {}  # param_id -> views into batches
        self._slot_names: dict[int, str] = {}
        self._calls = 0
        self._bytes_sent = 0
        self._bytes_dense = 0
        self._bytes_by_phase = {p: 0 for p in self.PHASES}
        self._steps_by_phase = {p: 0 for p in self.PHASES}
        self._step_phase: str | None = None
        self._nonfinite = None  # device counter of steps with a skipped (non-finite) bucket
        self._step_bad = None   # device flag: a bucket of the current step was non-finite
        self._counter_lock = threading.Lock()  # engine callbacks count from the worker thread

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

        ``model``: a module (DDP-wrapped or not) or an iterable of (name, param).
        Parameter ids are positions in ``named_parameters()`` order, which is
        the same on every rank and across restarts of the same model code.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        if isinstance(model, torch.nn.Module):
            owner = model
            module = model.module if isinstance(model, DDP) else model
            named = list(module.named_parameters())
        else:
            owner = None
            named = list(model)
        if self._model_ref is not None:
            bound = self._model_ref()
            if bound is not None and bound is not owner:
                raise RuntimeError(
                    "this lorecomm state is already bound to another model; create one state per model "
                    "(its error buffers and bases belong to that model's parameters)")
            if bound is None and self._params and owner is not None:
                raise RuntimeError("this lorecomm state's model was deleted; create a new state")
        if owner is not None:
            self._model_ref = weakref.ref(owner)
        self._params = {id(p): (i, name) for i, (name, p) in enumerate(named)}
        self._plans.clear()
        return self

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

    # -------------------------------------------------------------------- plans
    def _rank_for(self, m: int, n: int, name: str) -> int | None:
        """Rank to compress an m x n gradient with, or None for dense."""
        return None

    def _plan(self, buffer: torch.Tensor, params: Sequence[torch.Tensor], offsets) -> BucketPlan:
        """The bucket's plan (checked input; built once per bucket layout)."""
        if not isinstance(buffer, torch.Tensor) or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("buffer must be a contiguous 1-D gradient tensor")
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
        ids = [self._identity(p) for p in params]
        key = (buffer.numel(), buffer.dtype, buffer.device,
               tuple((pid, int(o)) for (pid, _), o in zip(ids, offsets)))
        plan = self._plans.get(key)
        if plan is None:
            described = [(pid, name, tuple(p.shape), int(o)) for (pid, name), p, o in zip(ids, params, offsets)]
            plan = build_plan(buffer.numel(), described, self._rank_for)
            self._init_plan_state(plan, buffer.device)
            self._plans[key] = plan
        return plan

    def _batch_tensor_specs(self, batch) -> dict[str, torch.Tensor]:
        """Fresh batched state tensors of one batch, e.g. {"E": zeros (B, a, b)}."""
        return {}

    def _init_plan_state(self, plan: BucketPlan, device: torch.device) -> None:
        """Allocate the plan's batched state; carry over each parameter's state.

        DDP rebuilds its buckets after the first iteration and a checkpoint may
        be loaded before any bucket is seen: per-parameter state (keyed by the
        stable parameter id, saved by name) moves into the new batches.
        """
        for batch in plan.batches:
            batch.tensors = {k: t.to(device) for k, t in self._batch_tensor_specs(batch).items()}
            for i, slot in enumerate(batch.slots):
                prev = self._slot_tensors.get(slot.param_id) or self._take_pending(slot.name)
                if prev is not None:
                    for k, t in batch.tensors.items():
                        t[i].copy_(prev[k])
                self._slot_tensors[slot.param_id] = {k: t[i] for k, t in batch.tensors.items()}
                self._slot_names[slot.param_id] = slot.name

    def _is_dense_name(self, name: str) -> bool:
        return name_is_dense(name, self.dense_name_patterns)

    # ------------------------------------------------------------ entry points
    def reduce(self, buffer: torch.Tensor, params: Sequence[torch.Tensor], offsets=None,
               is_last: bool = True) -> torch.Tensor:
        """Average ``buffer`` (local gradients of ``params``) across ranks, in place."""
        plan = self._plan(buffer, params, offsets)
        phase = self.phase(self.step + 1)
        sent = self._reduce_phase(phase, plan, buffer)
        self._account(phase, sent, buffer, is_last)
        if is_last:
            self._end_step()
        return buffer

    def _account(self, phase: str, sent: int, buffer: torch.Tensor, is_last: bool) -> None:
        """Count one bucket (bytes, calls) and, on the last bucket, the step."""
        with self._counter_lock:
            self._calls += 1
            self._bytes_sent += sent
            self._bytes_dense += _elem_bytes(buffer)
            self._bytes_by_phase[phase] += sent
            self._step_phase = phase
            if is_last:
                self._steps_by_phase[phase] += 1
                self.step += 1

    def _count_bytes(self, phase: str, sent: int) -> None:
        """Bytes known only once a bucket ran (e.g. a basis repair on the engine)."""
        with self._counter_lock:
            self._bytes_sent += sent
            self._bytes_by_phase[phase] += sent

    def reduce_async(self, buffer, params, offsets=None, is_last: bool = True) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(self.reduce(buffer, params, offsets, is_last))
        return fut

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

    def _reduce_phase(self, phase: str, plan: BucketPlan, buffer: torch.Tensor) -> int:
        """Run one bucket's phase in place; return the bytes this rank sent."""
        raise NotImplementedError

    def _all_reduce_mean(self, t: torch.Tensor) -> int:
        """Sum-all-reduce of ``t / N`` (DDP's convention); returns bytes sent."""
        t.div_(self.world_size)
        dist.all_reduce(t, group=self.group)
        return _elem_bytes(t)

    def _global_finite(self, buffer: torch.Tensor):
        """(the whole bucket is finite on every rank, bytes sent): one float all-reduced.

        For compressors without a score all-reduce that would carry the flag.
        """
        bad = torch.zeros(1, device=buffer.device)
        bad += (~torch.isfinite(buffer)).any()
        sent = self._all_reduce_mean(bad)
        return bad[0] == 0, sent

    def _count_nonfinite(self, ok: torch.Tensor) -> None:
        """Note one bucket's global finite flag (on device, no host sync)."""
        bad = ~ok
        self._step_bad = bad if self._step_bad is None else self._step_bad.to(bad.device) | bad

    def _end_step(self) -> None:
        """After the step's last bucket: count the step if any bucket was non-finite."""
        if self._step_bad is None:
            return
        bad = self._step_bad.to(torch.int64)
        self._step_bad = None
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite.to(bad.device) + bad

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Counters since construction (or as restored by load_state_dict)."""
        steps = self.step
        return {
            "steps": steps,
            "calls": self._calls,
            "bytes_sent": self._bytes_sent,
            "bytes_dense": self._bytes_dense,
            "compression_ratio": self._bytes_dense / self._bytes_sent if self._bytes_sent else 1.0,
            "bytes_per_step": self._bytes_sent / steps if steps else 0.0,
            "bytes_by_phase": dict(self._bytes_by_phase),
            "steps_by_phase": dict(self._steps_by_phase),
            "nonfinite_steps": int(self._nonfinite.sum().item()) if self._nonfinite is not None else 0,
            "compressed_matrices": len({s.param_id for p in self._plans.values() for s in p.matrices}),
        }

    # ------------------------------------------------------------- checkpoint
    def config(self) -> dict:
        """The constructor arguments that define the maths (checked on load)."""
        return {"dense_name_patterns": list(self.dense_name_patterns)}

    def _param_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter state tensors, keyed by parameter name."""
        return {self._slot_names[pid]: ts for pid, ts in self._slot_tensors.items()}

    def state_dict(self) -> dict:
        """This rank's state (error buffers are rank-local: save one file per rank)."""
        params = {name: {k: v.detach().cpu().clone() for k, v in ts.items()}
                  for name, ts in self._param_tensors().items()}
        for name, ts in self._pending.items():  # loaded but not placed yet: keep them
            params.setdefault(name, {k: v.clone() for k, v in ts.items()})
        return {
            "format": 1,
            "kind": type(self).__name__,
            "config": self.config(),
            "world_size": self.world_size,
            "step": self.step,
            "counters": {
                "calls": self._calls, "bytes_sent": self._bytes_sent, "bytes_dense": self._bytes_dense,
                "bytes_by_phase": dict(self._bytes_by_phase), "steps_by_phase": dict(self._steps_by_phase),
                "nonfinite_steps": self.stats()["nonfinite_steps"],
            },
            "params": params,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("kind") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {sd.get('kind')}, cannot load into {type(self).__name__}")
        if sd["world_size"] != self.world_size:
            raise ValueError(
                f"state_dict was saved with world size {sd['world_size']} but the process group now has "
                f"{self.world_size} ranks: error buffers are per rank, so resume with the same world size "
                f"(or start a new state)")
        if sd["config"] != self.config():
            diff = {k: (sd["config"].get(k), v) for k, v in self.config().items() if sd["config"].get(k) != v}
            raise ValueError(f"state_dict config differs from this state's (saved, current): {diff}")
        if self._params:  # bound: every saved parameter must exist, or its state would silently vanish
            known = {name for _, name in self._params.values()}
            unknown = sorted(set(sd["params"]) - known)
            if unknown:
                raise ValueError(
                    f"state_dict holds state for {len(unknown)} parameter(s) this model does not have "
                    f"(e.g. {', '.join(unknown[:3])}): it was saved from a different model")
        self.step = sd["step"]
        c = sd["counters"]
        self._calls, self._bytes_sent, self._bytes_dense = c["calls"], c["bytes_sent"], c["bytes_dense"]
        self._bytes_by_phase = dict(c["bytes_by_phase"])
        self._steps_by_phase = dict(c["steps_by_phase"])
        self._nonfinite = torch.tensor(c["nonfinite_steps"]) if c["nonfinite_steps"] else None
        placed = self._param_tensors()
        self._pending = {}
        for name, ts in sd["params"].items():
            if name in placed:
                for k, v in ts.items():
                    placed[name][k].copy_(v)
            else:
                self._pending[name] = ts

    def _take_pending(self, name: str) -> dict[str, torch.Tensor] | None:
        return self._pending.pop(name, None)
