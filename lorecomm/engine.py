"""Python side of the C++ bucket engine (``lorecomm._C.Engine``, csrc/engine.cpp).

``reduce_async(state, buffer, params, offsets, is_last)`` is the engine's
version of ``CommState.reduce_async`` for a :class:`GreedyLoreState`: the
Python layer plans the bucket (``state._plan``), derives the step's probe
keys and does the byte accounting exactly as ``CommState.reduce`` does, then
hands the bucket to the engine, which runs the phase on its worker thread
(CPU) or its own CUDA stream (GPU) and completes the returned future with the
bucket. The maths is the one of ``GreedyLoreState._compressed`` /
``_all_reduce_mean`` op for op, collective for collective, so both paths agree
bit for bit.

Covered by the engine: every phase of a :class:`GreedyLoreState` (warm-up,
refresh with its basis checksum and repair broadcast, compressed steps with
greedy, fixed or random selection, paper or sketch probes, with or without
error feedback). Other states run on their Python path.

Use: ``lorecomm.engine.reduce_async(state, ...)`` or the DDP hook
``lorecomm.engine.greedylore_engine_hook``; ``enabled(state)`` says whether the
state would use it (``set_enabled(state, False)`` or ``LORECOMM_ENGINE=0``
turn it off). ``drain(state)`` waits for the state's queued buckets.
"""
from __future__ import annotations

import atexit
import datetime
import os
import threading
import weakref
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["available", "enabled", "set_enabled", "engine_for", "reduce_async", "drain",
           "greedylore_engine_hook", "unavailable_reason", "shutdown_all"]

_lock = threading.Lock()
_engines: "weakref.WeakKeyDictionary[object, tuple[object, object]]" = weakref.WeakKeyDictionary()
_choice: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()
_all: "weakref.WeakSet" = weakref.WeakSet()
_SCORE_STREAM = 0
#: when a list, every collective the engine is asked to run is appended as
#: ("all_reduce", numel, dtype) at submission (benchmarks replay them)
trace: list | None = None


def _module():
    try:
        from . import _C
    except ImportError:
        return None
    return _C if getattr(_C, "HAS_ENGINE", False) else None


def unavailable_reason() -> str | None:
    if os.environ.get("LORECOMM_ENGINE", "1") in ("0", "off", "false"):
        return "disabled by LORECOMM_ENGINE=0"
    if _module() is None:
        return "lorecomm._C is not built or has no Engine (build with pip install -e .)"
    return None


def available() -> bool:
    """True when the compiled engine can be used in this process."""
    return unavailable_reason() is None


def _supported(state) -> bool:
    from .greedylore import GreedyLoreState

    return isinstance(state, GreedyLoreState)


def set_enabled(state, on: bool | None) -> None:
    """Force the engine on/off for ``state`` (None: automatic)."""
    if on is None:
        _choice.pop(state, None)
    else:
        if on and not available():
            raise RuntimeError(f"the lorecomm engine is not available: {unavailable_reason()}")
        if on and not _supported(state):
            raise ValueError(f"the lorecomm engine runs GreedyLoreState only, not {type(state).__name__}")
        _choice[state] = bool(on)


def enabled(state) -> bool:
    """Whether ``reduce_async`` of ``state`` should go through the engine."""
    choice = _choice.get(state)
    if choice is not None:
        return choice
    return available() and _supported(state)


def _timeout_ms(state) -> int:
    env = os.environ.get("LORECOMM_ENGINE_TIMEOUT_S")
    if env:
        return int(float(env) * 1000)
    t = getattr(state, "engine_timeout", None)
    if isinstance(t, datetime.timedelta):
        return int(t.total_seconds() * 1000)
    if isinstance(t, (int, float)):
        return int(t * 1000)
    return 0  # the process group's own timeout (Gloo enforces it per collective)


def engine_for(state):
    """The engine of ``state`` on its current process group (created on first use)."""
    group = state.group
    with _lock:
        entry = _engines.get(state)
        if entry is not None and entry[0] is group:
            return entry[1]
        if entry is not None:  # process group changed: retire the old engine
            entry[1].drain()
            entry[1].shutdown()
        mod = _module()
        if mod is None:
            raise RuntimeError(f"the lorecomm engine is not available: {unavailable_reason()}")
        eng = mod.Engine(group, _timeout_ms(state))
        _engines[state] = (group, eng)
        _all.add(eng)
        return eng


def drain(state) -> None:
    """Wait until every bucket ``state`` queued on its engine has finished."""
    entry = _engines.get(state)
    if entry is not None:
        entry[1].drain()


@atexit.register
def shutdown_all() -> None:
    """Stop every engine of this process (pending buckets fail) and release
    their process groups; runs at interpreter exit, call it before
    ``os._exit`` or to tear down early."""
    for eng in list(_all):
        try:
            eng.shutdown()
        except Exception:  # noqa: BLE001 - interpreter exit
            pass


def _keys(state, batch, t: int, device) -> torch.Tensor:
    return state._keys(batch, t, _SCORE_STREAM, device)


def reduce_async(state, buffer: torch.Tensor, params: Sequence[torch.Tensor], offsets=None,
                 is_last: bool = True):
    """``state.reduce_async`` through the engine; returns a future of ``buffer``.

    Same checks, plan, phase, accounting and step counting as
    ``CommState.reduce``.
    """
    from .state import _elem_bytes

    plan = state._plan(buffer, params, offsets)  # checks the input as CommState.reduce does
    t = state.step + 1
    phase = state.phase(t)
    eng = engine_for(state)
    label = f"bucket {state._calls} (step {t}, {buffer.numel()} elements)"
    dev = buffer.device
    ok = None  # the bucket's global finite flag, for the state's non-finite step count
    repairs = None
    if phase == "dense" or not plan.batches:
        fut = eng.submit_dense(buffer, label)
        sent = _elem_bytes(buffer)
        collectives = [(buffer.numel(), buffer.dtype)]
    elif phase == "refresh":
        ok = torch.empty((), dtype=torch.bool, device=dev)
        repairs = torch.zeros(len(plan.batches), dtype=torch.int64)
        fut = eng.submit_refresh(buffer, [(b.view(buffer), b.tensors["E"], b.tensors["U"]) for b in plan.batches],
                                 state.error_feedback, ok, repairs, label)
        n_sums = 2 * sum(b.size for b in plan.batches)
        sent = 4 * buffer.numel() + 8 * n_sums  # fp32 refresh + checksums; repairs counted on completion
        collectives = [(buffer.numel(), torch.float32), (n_sums, torch.int64)]
    else:
        ok = torch.empty((), dtype=torch.bool, device=dev)
        n_comm = sum(b.size * b.rank * b.b for b in plan.batches) + plan.dense_numel
        if state.selection == "greedy":
            batches = [(b.view(buffer), b.tensors["E"], b.tensors["U"], _keys(state, b, t, dev), b.rank)
                       for b in plan.batches]
            k = state.sketch_size if state.probes == "sketch" else 0
            fut = eng.submit_compressed(buffer, batches, list(plan.dense_ranges), k, state.error_feedback, ok, label)
            n_select = sum(b.size * b.a * max(k, 1) for b in plan.batches)  # the scores
        else:
            picks = state._given_picks(plan, t, dev)
            batches = [(b.view(buffer), b.tensors["E"], b.tensors["U"], J) for b, J in zip(plan.batches, picks)]
            fut = eng.submit_selected(buffer, batches, list(plan.dense_ranges), state.error_feedback, ok, label)
            n_select = 1  # the finite flag
        sent = 4 * (n_select + n_comm)
        collectives = [(n_select, torch.float32), (n_comm, torch.float32)]

    # runs on the worker when the bucket is done, in bucket order; a Python-level
    # then() also gives DDP's Python comm hooks the Python-object value they need
    def after(f, ok=ok, repairs=repairs, batches=plan.batches):
        value = f.value()  # re-raises the engine's error
        if ok is not None:
            state._count_nonfinite(ok)
        if repairs is not None:
            for b, repaired in zip(batches, repairs.tolist()):
                if repaired:
                    state._basis_repairs += 1
                    state._count_bytes(phase, _elem_bytes(b.tensors["U"]))
        if is_last:
            state._end_step()
        return value

    if trace is not None:
        trace.extend(("all_reduce", n, dtype) for n, dtype in collectives)
    state._account(phase, sent, buffer, is_last)  # as CommState.reduce
    return fut.then(after)


def greedylore_engine_hook(state, bucket):
    """DDP communication hook running ``state`` through the engine (until the
    core's ``greedylore_hook`` dispatches to it by itself)."""
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(f"expected a torch.distributed.GradBucket, got {type(bucket).__name__}")
    if not state._params:
        state._bind_from_ddp_bucket(bucket)
    buffer = bucket.buffer()
    esize = buffer.element_size()
    base = buffer.data_ptr()
    offsets = [(g.data_ptr() - base) // esize for g in bucket.gradients()]
    return reduce_async(state, buffer, bucket.parameters(), offsets, bucket.is_last())
