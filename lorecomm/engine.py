"""The engines every lorecomm state runs on (``lorecomm._C.Engine``, csrc/engine.h).

One engine per set of ranks (and mode), shared by every lorecomm state on those
ranks: one worker thread, one order of collectives, on a **private** process
group created (collectively) for it with ``dist.new_group`` over the same
ranks, so lorecomm never shares a group with DDP, autograd collectives, the
training loop or other hooks.

Modes: a worker thread that overlaps compression with the backward pass
(default), or inline on the caller's thread: ``LORECOMM_ENGINE=0`` (or
``set_inline(True)``) -- the same C++ code, the same bits.

``shutdown_all()`` stops every engine (pending buckets fail); it runs at
interpreter exit and waits at most ``LORECOMM_SHUTDOWN_GRACE_S`` (default 10)
seconds for a bucket that is still in a collective, then abandons that worker
so exit never hangs. ``reset_all()`` clears a failed engine's error state once
every rank has recovered.
"""
from __future__ import annotations

import atexit
import os
import threading
import warnings
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["Runtime", "runtime_for", "inline", "set_inline", "shutdown_all", "reset_all", "runtimes"]


def _module():
    from . import _C

    return _C


@dataclass
class Runtime:
    """An engine and the private process group it communicates on."""

    engine: object  # lorecomm._C.Engine
    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    backend: str


_lock = threading.Lock()
_runtimes: dict[tuple, Runtime] = {}
_inline_override: bool | None = None


def inline() -> bool:
    """Whether new engines run steps on the caller's thread (``LORECOMM_ENGINE=0``)."""
    if _inline_override is not None:
        return _inline_override
    return os.environ.get("LORECOMM_ENGINE", "1").strip().lower() in ("0", "off", "false", "inline")


def set_inline(on: bool | None) -> None:
    """Force the mode of engines created from now on (None: ``LORECOMM_ENGINE`` decides)."""
    global _inline_override
    _inline_override = on


def _seconds_from_env(name: str, default: float) -> float:
    env = os.environ.get(name, "").strip()
    if not env:
        return default
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{name}={env!r} is not a number of seconds >= 0; set it to e.g. 30, or unset it")
    return value


def _timeout_ms() -> int:
    return int(_seconds_from_env("LORECOMM_ENGINE_TIMEOUT_S", 0) * 1000)  # 0: the process group's own timeout


def runtime_for(group: dist.ProcessGroup) -> Runtime:
    """The engine for ``group``'s ranks, created on first use.

    Creating one is a collective over those ranks (``dist.new_group``): every
    rank must reach it in the same order, as it does when states are bound or
    run their first bucket at the same point of the program.
    """
    ranks = tuple(dist.get_process_group_ranks(group))
    backend = str(dist.get_backend(group))
    mode = inline()
    key = (backend, ranks, mode)
    with _lock:
        rt = _runtimes.get(key)
        if rt is not None and not rt.engine.stopped:
            return rt
    private = dist.new_group(ranks=list(ranks), backend=backend, use_local_synchronization=True)
    engine = _module().Engine(private, _timeout_ms(), mode)
    rt = Runtime(engine, private, ranks, backend)
    with _lock:
        _runtimes[key] = rt
    return rt


def runtimes() -> list[Runtime]:
    """Every live runtime of this process (benchmarks, tests)."""
    with _lock:
        return [rt for rt in _runtimes.values() if not rt.engine.stopped]


def reset_all() -> None:
    """Clear the failed state of every engine (after every rank recovered the same way)."""
    for rt in runtimes():
        rt.engine.reset()


@atexit.register
def shutdown_all(grace_s: float | None = None) -> bool:
    """Stop every engine of this process (pending buckets fail) and release their
    groups. Waits up to ``grace_s`` (default ``LORECOMM_SHUTDOWN_GRACE_S`` or 10 s)
    for a bucket still in a collective, then abandons its worker. Returns False
    if a worker had to be abandoned. Runs at interpreter exit."""
    if grace_s is None:
        try:
            grace_s = _seconds_from_env("LORECOMM_SHUTDOWN_GRACE_S", 10)
        except ValueError as e:  # at exit too: stop the engines anyway, with the default grace
            warnings.warn(f"{e}; using 10 s")
            grace_s = 10.0
    with _lock:
        rts = list(_runtimes.values())
        _runtimes.clear()
    clean = True
    for rt in rts:
        try:
            clean = bool(rt.engine.shutdown(grace_s)) and clean
        except Exception:  # noqa: BLE001 - interpreter exit
            clean = False
    return clean
