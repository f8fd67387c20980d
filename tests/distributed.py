"""Run a function on N real Gloo ranks (processes on 127.0.0.1) and collect results."""
from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lorecomm.integrations._launch import exit_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, world_size: int, store: str, outdir: str, args: tuple, backend: str) -> None:
    faulthandler.enable()  # a native crash in a rank shows its Python stacks
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # NCCL bootstraps over a socket even on one host
    torch.set_num_threads(1)
    try:
        # a file rendezvous: no TCP port to race for with other test processes
        if backend == "nccl":  # one GPU per rank (NCCL refuses two ranks on one device)
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=90))
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    exit_rank()  # no interpreter finalization: see its docstring


def run_ranks(fn, world_size: int = 2, *args, backend: str = "gloo"):
    """fn(rank, world_size, *args) on each rank; returns the list of results by rank.

    ``backend="nccl"`` gives rank i the GPU i % device_count (as its current device)."""
    with tempfile.TemporaryDirectory() as outdir:
        try:
            store = os.path.join(outdir, "rendezvous")
            mp.spawn(_worker, args=(fn, world_size, store, outdir, args, backend), nprocs=world_size, join=True)
        except Exception as e:
            errs = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.endswith(".err")]
            raise AssertionError(f"a rank failed ({e}):\n" + "\n".join(errs)) from e
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
