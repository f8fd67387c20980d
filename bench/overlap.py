"""Where one training step's time goes: backward, compression, communication,
and the exposed (not overlapped) remainder, for dense DDP, torch PowerSGD and
lorecomm's Lore and GreedyLore, on transformers of a few sizes.

Per (model size, method), on the same ranks and the same batch:
- ``backward``: loss.backward() with a no-op comm hook (pure backward compute
  plus DDP bookkeeping);
- ``compress``: the same with the method's hook on a one-rank process group,
  minus ``backward`` (compression/decompression compute; collectives of one
  rank cost ~nothing);
- ``comm``: the method's collectives replayed back to back on the real
  process group (sizes recorded from the method's own step, in issue order:
  torch's from ``dist.all_reduce``, lorecomm's from its engine's own log);
- ``step``: loss.backward() with the method's hook on the real group (DDP
  returns once every bucket's Future is done);
- ``exposed`` = step - backward: what the hook adds to the step; the overlap
  is 1 - exposed / (compress + comm).

torch's PowerSGD hook launches its second all-reduce from a Future callback,
which deadlocks with two or more buckets on Gloo, so on Gloo PowerSGD runs
with one bucket (noted in the table); dense and lorecomm use --bucket-mb.

On ``--device cuda`` every rank runs on a GPU (Gloo on CUDA tensors: all ranks may share one GPU;
``--backend nccl``: one GPU per rank) and each timed region ends with a device synchronize (DDP's
backward returns before the GPU has finished).

    python bench/overlap.py                               # CPU: tiny/small/medium
    python bench/overlap.py --sizes small --out bench/results/comm-overlap-cpu.md
    python bench/overlap.py --device cuda --sizes small medium base   # bench/gpu_check.sh
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import comm_util as cu  # noqa: E402
from lorecomm.integrations._launch import exit_rank  # noqa: E402
from hook_overhead import filter_methods  # noqa: E402

SIZES = {  # name: (d_model, layers, heads, vocab)
    "tiny": (128, 2, 4, 1024),
    "small": (256, 4, 4, 2048),
    "medium": (384, 4, 6, 4096),
    "base": (768, 12, 12, 32000),
}


class TinyLM(nn.Module):
    def __init__(self, d, layers, heads, vocab, seq):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        return self.lm_head(self.norm(self.blocks(self.embed(ids) + self.pos)))


def noop_hook(_, bucket):
    f = torch.futures.Future()
    f.set_result(bucket.buffer())
    return f


_DTYPES = {"Float": torch.float32, "BFloat16": torch.bfloat16, "Half": torch.float16, "Long": torch.int64}


class Recorder:
    """Records the collectives a step issues: torch's hooks through torch.distributed.all_reduce,
    lorecomm's engine in its own log (its worker thread issues them)."""

    def __init__(self):
        self.msgs: list[tuple[str, int, torch.dtype]] = []
        self.on = False
        self.engine = None
        self._orig = dist.all_reduce

        def all_reduce(tensor, *a, **k):
            if self.on:
                self.msgs.append(("all_reduce", tensor.numel(), tensor.dtype))
            return self._orig(tensor, *a, **k)

        dist.all_reduce = all_reduce

    def start(self, state):
        self.msgs.clear()
        self.on = True
        self.engine = state._runtime().engine if hasattr(state, "_runtime") else None
        if self.engine is not None:
            self.engine.collective_log(True)
            self.engine.set_logging(True)

    def stop(self):
        self.on = False
        if self.engine is not None:
            self.engine.set_logging(False)
            self.msgs += [(op, n, _DTYPES[dt]) for op, n, dt, _ in self.engine.collective_log(True)]
            self.engine = None


def make_state(kind, pg, args, ddp):
    from hook_overhead import make_hook

    if kind == "dense":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return pg, default_hooks.allreduce_hook
    return make_hook(kind, args.rank, args, ddp, pg=pg)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_backward(ddp, ids, tgt, steps, warmup, bind_state=None):
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for s in range(warmup + steps):
        ddp.zero_grad(set_to_none=False)
        out = ddp(ids)
        loss = loss_fn(out.flatten(0, 1), tgt.flatten())
        _sync(ids.device)
        dist.barrier()
        t0 = time.perf_counter()
        loss.backward()
        _sync(ids.device)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world_size, port, args, q):
    cu.init_pg(rank, world_size, port, args.backend)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count() if args.backend == "nccl" else 0)
        torch.cuda.set_device(device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    solos = [dist.new_group([r]) for r in range(world_size)]  # collective: every rank creates all
    solo = solos[rank]
    rec = Recorder()
    rows = []
    for size in args.sizes:
        d, L, H, V = SIZES[size]
        g = torch.Generator().manual_seed(100 + rank)
        ids = torch.randint(0, V, (args.batch, args.seq), generator=g).to(device)
        tgt = torch.randint(0, V, (args.batch, args.seq), generator=g).to(device)

        def build(kind, pg):
            torch.manual_seed(0)
            model = TinyLM(d, L, H, V, args.seq).to(device)
            one_bucket = one_bucket_of(kind)
            ddp = DDP(model, process_group=pg, gradient_as_bucket_view=True,
                      device_ids=[device.index] if device.type == "cuda" else None,
                      bucket_cap_mb=10_000 if one_bucket else args.bucket_mb)
            return ddp

        def one_bucket_of(kind):
            return kind == "powersgd" and args.backend == "gloo"

        nparams = sum(p.numel() for p in TinyLM(d, L, H, V, args.seq).parameters())
        ddp = build("dense", None)
        ddp.register_comm_hook(None, noop_hook)
        t_bwd = _time_backward(ddp, ids, tgt, args.steps, args.warmup)
        for kind in args.methods:
            # compression compute: the hook on a one-rank group
            ddp = build(kind, solo)
            st, hook = make_state(kind, solo, args, ddp)
            ddp.register_comm_hook(st, hook)
            t_solo = _time_backward(ddp, ids, tgt, args.steps, args.warmup)
            # the real step, recording the collectives of the last step
            ddp = build(kind, None)
            st, hook = make_state(kind, None, args, ddp)
            ddp.register_comm_hook(st, hook)
            t_step = _time_backward(ddp, ids, tgt, args.steps, args.warmup)
            rec.start(st)
            _time_backward(ddp, ids, tgt, 1, 0)
            rec.stop()
            msgs = list(rec.msgs)
            nbytes = sum(n * torch.empty((), dtype=dt).element_size() for _, n, dt in msgs)
            # replay the messages back to back on the real group
            bufs = [torch.zeros(n, dtype=dt, device=device) for _, n, dt in msgs]
            ts = []
            for it in range(args.warmup + args.steps):
                _sync(device)
                dist.barrier()
                t0 = time.perf_counter()
                for b in bufs:
                    rec._orig(b)
                _sync(device)
                if it >= args.warmup:
                    ts.append(time.perf_counter() - t0)
            t_comm = statistics.median(ts)
            comp = max(0.0, t_solo - t_bwd)
            exposed = t_step - t_bwd
            overlap = 1 - exposed / (comp + t_comm) if comp + t_comm > 0 else float("nan")
            rows.append([size, f"{nparams / 1e6:.2f}M", kind + (" (1 bucket)" if one_bucket_of(kind) else ""),
                         f"{t_bwd * 1e3:.1f}", f"{comp * 1e3:.1f}", f"{t_comm * 1e3:.1f}",
                         f"{t_step * 1e3:.1f}", f"{exposed * 1e3:.1f}", f"{exposed / t_bwd:.0%}", f"{overlap:.0%}",
                         len(msgs), f"{nbytes / 2**20:.2f}"])
            dist.barrier()
        if rank == 0 and args.out:  # the sizes so far: a run cut short (a time limit) still leaves them
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(render(args, rows, partial=size != args.sizes[-1]))
    if rank == 0:
        q.put(rows)
    exit_rank()  # SimpleQueue.put is synchronous; exit_rank says why not a normal exit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                   help="nccl: one GPU per rank (--device cuda, world size <= GPUs)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=list(SIZES))
    p.add_argument("--methods", nargs="+", default=["dense", "powersgd", "lore", "greedylore-sketch"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="PowerSGD / GreedyLore rank")
    p.add_argument("--lore-rank", type=int, default=None, help="Lore's rank (default 2 x --rank: the same bytes)")
    p.add_argument("--update-interval", type=int, default=1000)
    p.add_argument("--bucket-mb", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (warm-up, refresh, bucket rebuild)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda is not available")
    if args.backend == "nccl" and (args.device != "cuda" or args.world_size > torch.cuda.device_count()):
        p.error(f"--backend nccl needs --device cuda and one GPU per rank (world size {args.world_size}, "
                f"{torch.cuda.device_count()} GPU(s)); use --backend gloo to share a GPU")
    args.methods, skipped = filter_methods(args.methods)
    if skipped:
        print(f"skipping {skipped}", file=sys.stderr)
    import torch.multiprocessing as mp

    args.skipped, args.argv = skipped, list(argv if argv is not None else sys.argv[1:])
    q = mp.get_context("spawn").SimpleQueue()
    cu.spawn(_worker, args.world_size, args, q)
    rows = q.get()
    cu.write_result(args.out, render(args, rows))
    return rows


def render(args, rows, partial: bool = False) -> str:
    where = (f"{args.backend.upper() if args.backend == 'nccl' else 'Gloo'}, {args.world_size} ranks, "
             + (torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"))
    text = cu.header(f"Step breakdown: backward / compression / communication / exposed ({where})",
                     "python bench/overlap.py " + " ".join(args.argv))
    text += (f"\nPre-LN transformer LM (embedding + encoder layers + head), batch {args.batch} x seq {args.seq}, "
             f"rank {args.rank}, buckets {args.bucket_mb} MB, {args.threads} torch thread(s) per rank, medians "
             f"of {args.steps} steps. Times in ms; 'exposed/bwd' = exposed / backward (the overlap target: under 10% "
             f"where the dense all-reduce takes longer than the backward)."
             + (" CPU only: GPU stream overlap is not measured here." if args.device == "cpu" else "") + "\n\n")
    text += cu.md_table(["model", "params", "method", "backward", "compress", "comm", "step", "exposed",
                         "exposed/bwd", "overlap", "msgs", "MB/step"], rows)
    if args.skipped:
        text += f"\nNot run: {'; '.join(args.skipped)}.\n"
    if partial:
        text += "\nPartial: the run stopped before its last size.\n"
    return text


if __name__ == "__main__":
    main()
