"""Host time per bucket: lorecomm's hooks (Lore, GreedyLore) vs torch's powerSGD_hook.

Same model, same rank, same process group, one DDP bucket (torch's PowerSGD
hook launches its second all-reduce from a Future callback, which breaks with
two or more buckets on Gloo, so the comparison uses a single bucket).

For each hook the script times, per bucket and on compressed steps only:
- ``call``: wall time of the hook call itself (what blocks the thread that
  runs the backward pass),
- ``latency``: from the hook call to its Future being done (compression +
  communication + decompression),
and reports medians over the measured steps. Every hook runs on the same
ranks in the same process, one after the other. Lore runs at twice
PowerSGD's rank by default (``--lore-rank``): its bf16 factors send the same
bytes, and with ``auto_dense`` off: its link probe would otherwise send
some of the timed steps dense, and these are timings of compressed steps.
``-inline`` runs lorecomm's engine on the caller's thread
(``LORECOMM_ENGINE=0``), otherwise on its worker thread.

    python bench/hook_overhead.py                  # 2 Gloo ranks, 8 x 1024x1024
    python bench/hook_overhead.py --out bench/results/comm-hook-overhead-cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import comm_util as cu  # noqa: E402
from lorecomm.integrations._launch import exit_rank  # noqa: E402


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=True) for _ in range(layers)])


def lorecomm_available() -> str | None:
    """None if lorecomm's engine can run here, else the reason."""
    try:
        import lorecomm._C  # noqa: F401

        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def filter_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """(runnable, skipped-with-reason) among dense / powersgd / lore[-inline] / greedylore[-sketch][-inline]."""
    lc = lorecomm_available()
    keep, skipped = [], []
    for m in methods:
        if (m.startswith("greedylore") or m.startswith("lore")) and lc is not None:
            skipped.append(f"{m} ({lc})")
        else:
            keep.append(m)
    return keep, skipped


def plain_hook(hook):
    """The hook without annotations (DDP rejects a string return annotation)."""

    def hook_(state, bucket):
        return hook(state, bucket)

    hook_.__name__ = getattr(hook, "__name__", "hook")
    return hook_


def make_hook(kind: str, rank: int, args, model, pg=None):
    """(state, hook) for one of: dense, powersgd, lore[-inline], greedylore[-sketch][-inline]."""
    if kind == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        st = ps.PowerSGDState(process_group=pg, matrix_approximation_rank=rank,
                              start_powerSGD_iter=2, min_compression_rate=2, use_error_feedback=True,
                              warm_start=True, orthogonalization_epsilon=0, random_seed=0)
        return st, ps.powerSGD_hook
    if kind.startswith("greedylore") or kind.startswith("lore"):
        import lorecomm
        import lorecomm.engine as le

        le.set_inline("inline" in kind)
        if kind.startswith("lore"):
            st = lorecomm.LoreState(process_group=pg, rank=args.lore_rank or 2 * rank, start_step=1,
                                    dense_name_patterns=(), dense_embeddings=False, auto_dense=False)
        else:
            probes = "sketch" if "sketch" in kind else "paper"
            st = lorecomm.GreedyLoreState(process_group=pg, rank=rank, update_interval=args.update_interval,
                                          start_step=1, probes=probes, dense_name_patterns=())
        st.bind(model)  # joins the engine (of the mode just set)
        le.set_inline(None)
        return st, plain_hook(lorecomm.hook_for(st))
    if kind == "dense":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return pg, default_hooks.allreduce_hook
    raise ValueError(kind)


def timed_hook(hook, rec: dict):
    """Wrap a DDP hook: record call time and call-to-done latency per bucket."""

    def wrapped(state, bucket):
        t0 = time.perf_counter()
        fut = hook(state, bucket)
        t1 = time.perf_counter()
        rec["call"].append(t1 - t0)

        def _mark(f):
            rec["latency"].append(time.perf_counter() - t0)
            return f.value()

        return fut.then(_mark)

    return wrapped


def _worker(rank, world_size, port, args, q):
    cu.init_pg(rank, world_size, port, "gloo")
    torch.set_num_threads(args.threads)
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    for kind in args.hooks:
        model = make_model(args.width, args.layers)
        ddp = DDP(model, bucket_cap_mb=10_000, gradient_as_bucket_view=True)  # one bucket
        state, hook = make_hook(kind, args.rank, args, ddp)
        rec = {"call": [], "latency": []}
        ddp.register_comm_hook(state, timed_hook(hook, rec))
        # warm-up: dense / refresh steps, DDP's bucket rebuild, first compressed steps
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                rec["call"].clear()
                rec["latency"].clear()
            ddp.zero_grad(set_to_none=False)
            ddp(x).square().mean().backward()
        results[kind] = (statistics.median(rec["call"]), statistics.median(rec["latency"]), len(rec["call"]))
        dist.barrier()
    if rank == 0:
        q.put(results)
    exit_rank()  # SimpleQueue.put is synchronous; exit_rank says why not a normal exit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=32, help="compression rank (PowerSGD, GreedyLore)")
    p.add_argument("--lore-rank", type=int, default=None, help="Lore's rank (default 2 x --rank: the same bytes)")
    p.add_argument("--update-interval", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (dense, refresh, bucket rebuild)")
    p.add_argument("--steps", type=int, default=10, help="timed compressed steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hooks", nargs="+", default=["dense", "powersgd", "lore", "lore-inline", "greedylore-sketch",
                                                     "greedylore-sketch-inline"],
                   help="lorecomm's engine on its worker thread, or *-inline on the caller's thread")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.hooks, skipped = filter_methods(args.hooks)
    if skipped:
        print(f"skipping {skipped}", file=sys.stderr)
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    cu.spawn(_worker, args.world_size, args, q)
    res = q.get()
    mb = (args.width * args.width + args.width) * args.layers * 4 / 2**20
    text = cu.header(f"Hook overhead per bucket (Gloo, {args.world_size} ranks)",
                     "python bench/hook_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    text += (f"\nModel: {args.layers} x Linear({args.width}, {args.width}) = one {mb:.1f} MB fp32 bucket; "
             f"rank {args.rank} (Lore {args.lore_rank or 2 * args.rank}, bf16 factors: the same bytes); batch {args.batch}; {args.threads} torch thread(s) per rank; "
             f"medians over {args.steps} compressed steps. `call` = time the hook call blocks the "
             f"backward thread; `latency` = hook call to Future done (compute + communication).\n\n")
    rows = []
    ref = res.get("powersgd")
    for k, (call, lat, n) in res.items():
        rows.append([k, f"{call * 1e3:.2f}", f"{lat * 1e3:.2f}",
                     f"{lat / ref[1]:.2f}" if ref else "-", n])
    text += cu.md_table(["hook", "call (ms)", "latency (ms)", "latency / PowerSGD", "buckets"], rows)
    if skipped:
        text += f"\nNot run: {'; '.join(skipped)}.\n"
    cu.write_result(args.out, text)
    return res


if __name__ == "__main__":
    main()
