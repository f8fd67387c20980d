"""c10d all-reduce bandwidth: one tensor, sizes from 4 KB up to 1 GB.

Reports time per all-reduce, algorithm bandwidth (bytes / time) and bus
bandwidth (algbw * 2(n-1)/n, the nccl-tests convention) through
torch.distributed (Gloo on CPU, NCCL on GPU). This is the physical limit the
compressed hooks are held to.

    python bench/allreduce.py                       # CPU default: 2 ranks, 4 KB..64 MB
    python bench/allreduce.py --max-bytes 1G        # full sweep (GPU / big host)
    python bench/allreduce.py --out bench/results/comm-allreduce-cpu.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import comm_util as cu  # noqa: E402
from lorecomm.integrations._launch import exit_rank  # noqa: E402


def _sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 4 if s < hi // 64 else 2
    return out


def _worker(rank, world_size, port, args, q):
    cu.init_pg(rank, world_size, port, args.backend)
    dev = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(max(1, args.threads))
    dtype = getattr(torch, args.dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    rows = []
    t_start = time.perf_counter()
    for nbytes in _sizes(args.min_bytes, args.max_bytes):
        numel = max(1, nbytes // esize)
        x = torch.ones(numel, dtype=dtype, device=dev)
        for _ in range(args.warmup):
            dist.all_reduce(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        # iterations: fixed, but never more than ~1 s per size on slow links
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        one = time.perf_counter() - t0
        iters = max(1, min(args.iters, int(args.seconds_per_size / max(one, 1e-6))))
        it = torch.tensor([iters], dtype=torch.int64, device=dev)
        dist.all_reduce(it, op=dist.ReduceOp.MIN)  # same count on every rank
        iters = int(it.item())
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / iters
        tt = torch.tensor([dt], dtype=torch.float64, device=dev)
        dist.all_reduce(tt, op=dist.ReduceOp.MAX)  # slowest rank defines the time
        dt = float(tt.item())
        algbw = numel * esize / dt / 1e9
        busbw = algbw * 2 * (world_size - 1) / world_size
        rows.append((numel * esize, iters, dt, algbw, busbw))
        del x
        stop = torch.tensor([time.perf_counter() - t_start > args.time_budget], device=dev)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if bool(stop.item()):
            break
    if rank == 0:
        q.put(rows)
    exit_rank()  # SimpleQueue.put is synchronous; exit_rank says why not a normal exit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default=cu.default_backend(), choices=["gloo", "nccl"])
    p.add_argument("--min-bytes", type=cu.parse_bytes, default=cu.parse_bytes("4K"))
    p.add_argument("--max-bytes", type=cu.parse_bytes, default=None,
                   help="largest message (default 1G on GPU, 64M on CPU to keep the run < 2 min)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=20, help="max timed iterations per size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds-per-size", type=float, default=1.0)
    p.add_argument("--time-budget", type=float, default=100.0, help="stop the sweep after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--out", default=None, help="write a markdown result file")
    args = p.parse_args(argv)
    if args.max_bytes is None:
        args.max_bytes = cu.parse_bytes("1G" if args.backend == "nccl" else "64M")
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    cu.spawn(_worker, args.world_size, args, q)
    rows = q.get()
    n = args.world_size
    text = cu.header(f"c10d all-reduce ({args.backend}, {n} ranks, {args.dtype})",
                     "python bench/allreduce.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    text += (f"\nbusbw = algbw * 2(n-1)/n = algbw * {2 * (n - 1) / n:.3f} (nccl-tests convention). "
             "Ranks are local processes; on CPU the 'link' is loopback TCP through Gloo.\n\n")
    text += cu.md_table(["size", "iters", "time (us)", "algbw (GB/s)", "busbw (GB/s)"],
                        [[cu.human_bytes(b), it, f"{dt * 1e6:.1f}", f"{a:.3f}", f"{bb:.3f}"]
                         for b, it, dt, a, bb in rows])
    cu.write_result(args.out, text)
    return rows


if __name__ == "__main__":
    main()
