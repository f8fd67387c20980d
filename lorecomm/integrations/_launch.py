"""Run a function on N local CPU ranks (Gloo on 127.0.0.1); for tests and examples.

Each rank gets the usual launcher environment (MASTER_ADDR, MASTER_PORT,
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) and initialises nothing
itself, so a stack can set up torch.distributed its own way (DeepSpeed,
Lightning, Accelerate do). Not part of the public API.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(timeout_s: float = 120.0) -> None:
    """init_process_group("gloo") from the environment set by :func:`run_ranks`."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def exit_rank(code: int = 0):
    """End a spawned rank whose work succeeded, without interpreter finalization.

    torch's Gloo backend threads can drop the last reference to a tensor or
    future that Python owns after the interpreter has started finalizing (or
    while the group is torn down); the GIL acquire that follows aborts the
    process ("terminate called without an active exception",
    pytorch/pytorch#179291 and #190489). CI saw exactly that, rarely, in ranks
    whose work had all succeeded. So: free cycles, stop lorecomm's engines,
    wait at a barrier until every rank is done with its collectives, flush
    stdio and ``os._exit``. Results must already be written (files, or a
    ``SimpleQueue``, whose ``put`` is synchronous).
    """
    import gc
    import sys

    import torch.distributed as dist

    gc.collect()
    from .. import engine

    engine.shutdown_all()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while a peer still needs it in a collective
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _worker(rank, fn, world_size, port, outdir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), NODE_RANK="0",
                      GROUP_RANK="0", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        raise
    exit_rank()


def run_ranks(fn, world_size: int = 2, *args):
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; results by rank."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.spawn(_worker, args=(fn, world_size, free_port(), outdir, args), nprocs=world_size, join=True)
        except Exception as e:
            errs = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
            raise AssertionError("a rank failed:\n" + "\n".join(errs)) from e
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def count_calls(state) -> list:
    """Count the compressor calls of ``state`` per step (tests: don't assume, count).

    Wraps ``state.reduce`` and ``state.reduce_async`` on the instance (outermost
    call only, so reduce_async built on reduce counts once). Returns a list;
    append 0 at the start of each step and read the per-step counts.
    """
    counts = [0]
    depth = [0]

    def wrap(fn):
        def counted(*a, **k):
            if depth[0] == 0:
                counts[-1] += 1
            depth[0] += 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
        return counted

    state.reduce = wrap(state.reduce)
    state.reduce_async = wrap(state.reduce_async)
    counts.clear()
    return counts
