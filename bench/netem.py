"""Bandwidth-limited wall clock: two ranks in two network namespaces joined by
a veth pair shaped with ``tc`` (token bucket, both directions), Gloo across
it (GLOO_SOCKET_IFNAME). A model whose dense all-reduce dominates the step.

Per link rate and method: time per training step (forward + backward with
the hook + optimizer step; compressed steps only: warm-up and refresh steps are
excluded and their amortised cost is reported separately), payload bytes per
step (what the hook all-reduces, per rank) and wire bytes per step (the veth's
tx counter: payload + Gloo/TCP/IP framing).

Methods: dense (fp32 all-reduce), bf16 (bf16-cast all-reduce; torch's
bf16_compress_hook refuses CPU), powersgd (torch's powerSGD_hook, unmodified,
at ``--rank``), lore (lorecomm's default, at ``--lore-rank``, default twice
``--rank``: its bf16 factors send PowerSGD's bytes), greedylore (the paper's).
By default every method uses one DDP bucket; ``--bucket-mb`` gives dense, bf16
and lorecomm DDP buckets of that size (torch's PowerSGD keeps one: it
deadlocks with 2+ buckets on Gloo).

Needs root and iproute2 (``ip``, ``tc``); creates namespaces lcnetA-<pid>,
lcnetB-<pid> with 10.77.0.1/2 on a private veth pair and deletes them on exit.

    sudo python bench/netem.py                          # 1 and 10 Gbit/s, 8 x 1024^2
    python bench/netem.py --rates 1gbit --out bench/results/comm-netem-cpu.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comm_util as cu  # noqa: E402
from lorecomm.integrations._launch import exit_rank  # noqa: E402

ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
METHODS = ["dense", "bf16", "powersgd", "lore", "greedylore"]


def netns_unavailable() -> str | None:
    """None if this process can build a shaped veth pair, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) not found"
    return None


def _sh(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


class VethPair:
    """Two namespaces joined by a veth pair; ``shape(rate)`` sets tbf on both ends."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"lcnetA-{tag}", f"lcnetB-{tag}")
        self.dev = (f"lcvA{tag}", f"lcvB{tag}")

    def __enter__(self):
        a, b = self.ns
        da, db = self.dev
        try:
            _sh("ip", "netns", "add", a)
            _sh("ip", "netns", "add", b)
            _sh("ip", "link", "add", da, "type", "veth", "peer", "name", db)
            _sh("ip", "link", "set", da, "netns", a)
            _sh("ip", "link", "set", db, "netns", b)
            for ns, dev, addr in ((a, da, ADDR_A), (b, db, ADDR_B)):
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.__exit__()
            raise
        return self

    def shape(self, rate: str | None):
        for ns, dev in zip(self.ns, self.dev):
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if rate:
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", "512kb", "latency", "50ms")

    def __exit__(self, *exc):
        for ns in self.ns:  # deleting a namespace deletes its end of the veth, and the pair
            _sh("ip", "netns", "del", ns, check=False)


# ---------------------------------------------------------------- the worker
def bf16_hook(pg, bucket):
    """bf16-cast dense averaging (torch's bf16_compress_hook refuses CPU/Gloo)."""
    import torch
    import torch.distributed as dist

    buf = bucket.buffer()
    t = buf.to(torch.bfloat16).div_(dist.get_world_size(pg))
    fut = dist.all_reduce(t, group=pg, async_op=True).get_future()

    def done(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(done)


def _payload_bytes(kind, model, state, rank) -> int:
    numel = sum(p.numel() for p in model.parameters())
    if kind == "dense":
        return 4 * numel
    if kind == "bf16":
        return 2 * numel
    if kind == "powersgd":  # same rule as powerSGD_hook: P and Q of the compressible matrices, rest dense
        tot = 0
        for p in model.parameters():
            if p.dim() >= 2:
                m, n = p.shape[0], p.numel() // p.shape[0]
                r = min(m, n, rank)
                if (m + n) * r * state.min_compression_rate < m * n:
                    tot += (m + n) * r * 4
                    continue
            tot += p.numel() * 4
        return tot
    raise ValueError(kind)  # lorecomm's states count what their timed steps sent themselves


def worker(args):
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["GLOO_SOCKET_IFNAME"] = args.ifname
    torch.set_num_threads(args.threads)
    import datetime as dt

    dist.init_process_group("gloo", init_method=f"tcp://{ADDR_A}:{args.port}", rank=args.rank_id,
                            world_size=2, timeout=dt.timedelta(seconds=120))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    one_bucket = args.bucket_mb is None or args.method == "powersgd"  # PowerSGD: 1 bucket on Gloo
    ddp = DDP(model, bucket_cap_mb=10_000 if one_bucket else args.bucket_mb, gradient_as_bucket_view=True)
    state = None
    if args.method == "bf16":
        ddp.register_comm_hook(None, bf16_hook)
    elif args.method == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank,
                                 start_powerSGD_iter=2, min_compression_rate=2, use_error_feedback=True,
                                 warm_start=True, random_seed=0)
        ddp.register_comm_hook(state, ps.powerSGD_hook)
    elif args.method in ("lore", "greedylore"):
        import lorecomm
        import lorecomm.engine as le

        le.set_inline(args.inline)
        if args.method == "lore":
            # 4 dense warm-up steps, 8 compressed and 6 dense steps timed by auto_dense (the first 2 of
            # them not counted), which decides at step 19 (in the untimed warm-up when --warmup >= 19):
            # the timed steps show its choice
            state = lorecomm.register(ddp, rank=args.lore_rank or 2 * args.rank, start_step=4,
                                      auto_dense=args.auto_dense)
        else:
            state = lorecomm.register(ddp, compressor="greedylore", rank=args.rank,
                                      update_interval=args.update_interval, start_step=1, probes=args.probes,
                                      dense_name_patterns=())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(args.rank_id))
    tx_path = f"/sys/class/net/{args.ifname}/statistics/tx_bytes"

    def step():
        opt.zero_grad(set_to_none=False)
        ddp(x).square().mean().backward()
        opt.step()

    # warm-up: dense / PowerSGD's first iteration, GreedyLore's dense start + refresh, bucket rebuild
    warm = []
    for _ in range(args.warmup):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    dist.barrier()
    lorecomm_state = args.method in ("lore", "greedylore")
    sent0 = state.stats()["bytes_sent"] if lorecomm_state else 0
    tx0 = int(open(tx_path).read())
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    tx1 = int(open(tx_path).read())
    auto = state.stats().get("auto_dense") if args.method == "lore" else None
    res = {"method": args.method, "time": statistics.median(times), "mean": statistics.mean(times),
           "auto_dense": auto or None,
           "warm": warm, "wire": (tx1 - tx0) / args.steps,
           "payload": ((state.stats()["bytes_sent"] - sent0) / args.steps if lorecomm_state
                       else _payload_bytes(args.method, model, state, args.rank)),
           "numel": sum(p.numel() for p in model.parameters())}
    if args.rank_id == 0:
        print("RESULT " + json.dumps(res), flush=True)
    exit_rank()  # not destroy_process_group + a normal exit: see exit_rank


# ------------------------------------------------------------------ driver
def run_pair(net: VethPair, method: str, args, attempts: int = 2) -> dict:
    """One method on the two namespaces; retried once if a rank dies of a signal
    (torch's PowerSGD hook on Gloo occasionally aborts at teardown)."""
    for i in range(attempts):
        try:
            return _run_pair_once(net, method, args)
        except _Crashed as e:
            if i == attempts - 1:
                raise RuntimeError(str(e)) from None
            print(f"[netem] {method}: {e.args[0].splitlines()[0]}; retrying", file=sys.stderr, flush=True)
    raise AssertionError


class _Crashed(RuntimeError):
    pass


def _run_pair_once(net: VethPair, method: str, args) -> dict:
    port = 29000 + (os.getpid() + hash(method)) % 20000
    procs = []
    for rid in (0, 1):
        cmd = ["ip", "netns", "exec", net.ns[rid], sys.executable, os.path.abspath(__file__), "--worker",
               "--rank-id", str(rid), "--port", str(port), "--ifname", net.dev[rid], "--method", method,
               "--width", str(args.width), "--layers", str(args.layers), "--batch", str(args.batch),
               "--rank", str(args.rank), "--update-interval", str(args.update_interval),
               "--probes", args.probes, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--lore-rank", str(args.lore_rank or 2 * args.rank),
               "--threads", str(args.threads)] + (["--inline"] if args.inline else []) + \
            ([] if args.auto_dense else ["--no-auto-dense"]) + \
            ([] if args.bucket_mb is None else ["--bucket-mb", str(args.bucket_mb)])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cu.ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"{method}: ranks did not finish within {args.timeout} s")
    for p, (o, e) in zip(procs, outs):
        if p.returncode < 0:
            raise _Crashed(f"{method}: rank killed by signal {-p.returncode}:\n{e[-3000:]}")
        if p.returncode != 0:
            raise RuntimeError(f"{method}: rank exited with {p.returncode}:\n{e[-3000:]}")
    for line in outs[0][0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{method}: no result from rank 0:\n{outs[0][1][-3000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"], help="tc rates ('none' = unshaped)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=32, help="compression rank (PowerSGD and GreedyLore)")
    p.add_argument("--lore-rank", type=int, default=None, help="Lore's rank (default 2 x --rank: the same bytes)")
    p.add_argument("--update-interval", type=int, default=200)
    p.add_argument("--probes", default="sketch", choices=["paper", "sketch"])
    p.add_argument("--warmup", type=int, default=20, help="untimed steps (Lore: 4 dense + auto_dense's 8 + 6)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="DDP bucket size for dense/bf16/lore/greedylore (default: one bucket for every method; "
                        "PowerSGD always gets one bucket, its hook breaks with 2+ on Gloo)")
    p.add_argument("--no-auto-dense", dest="auto_dense", action="store_false",
                   help="Lore never falls back to dense (default: it decides after 8 compressed steps)")
    p.add_argument("--inline", action="store_true",
                   help="run lorecomm's engine on the caller's thread (LORECOMM_ENGINE=0) instead of its worker")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole method list this many times, interleaved (this box's noise is +-20%%): "
                        "the table shows medians over repeats, the targets each repeat's ratios")
    p.add_argument("--out", default=None)
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ifname", default="", help=argparse.SUPPRESS)
    p.add_argument("--method", default="dense", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    reason = netns_unavailable()
    if reason:
        sys.exit(f"bench/netem.py: {reason}")
    from hook_overhead import lorecomm_available

    lc = lorecomm_available()
    skipped = []
    for m in ("lore", "greedylore"):
        if lc is not None and m in args.methods:
            args.methods.remove(m)
            skipped.append(f"{m} ({lc})")
    if args.repeats < 1:
        sys.exit(f"bench/netem.py: --repeats must be >= 1, got {args.repeats}")
    runs = {}  # (rate, method) -> one result per repeat
    with VethPair() as net:
        for rep in range(args.repeats):
            for rate in args.rates:
                net.shape(None if rate == "none" else rate)
                for m in args.methods:
                    print(f"[netem] repeat {rep + 1}/{args.repeats} {rate} {m} ...", file=sys.stderr, flush=True)
                    runs.setdefault((rate, m), []).append(run_pair(net, m, args))
    # the table: per (rate, method) the repeat of median time
    results = {k: sorted(v, key=lambda r: r["time"])[(len(v) - 1) // 2] for k, v in runs.items()}
    numel = next(iter(results.values()))["numel"]
    text = cu.header("Bandwidth-limited step time (2 ranks, 2 network namespaces, veth + tc tbf, Gloo)",
                     "python bench/netem.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])))
    text += (f"\nModel: {args.layers} x Linear({args.width}, {args.width}) + bias = {numel / 1e6:.2f}M params "
             f"({numel * 4 / 2**20:.1f} MB fp32), {'one DDP bucket' if args.bucket_mb is None else f'{args.bucket_mb} MB DDP buckets (PowerSGD: one bucket)'}, batch {args.batch}, SGD; rank {args.rank} for "
             f"PowerSGD and GreedyLore (probes={args.probes}, update_interval={args.update_interval}), "
             f"rank {args.lore_rank or 2 * args.rank} for Lore (bf16 factors); lorecomm's engine "
             f"{'inline' if args.inline else 'on its worker thread'}; "
             f"{args.threads} torch thread(s) per rank; medians of {args.steps} compressed steps after "
             f"{args.warmup} warm-up steps" +
             (f"; every method run {args.repeats} times, interleaved, the table showing each one's median "
              f"repeat" if args.repeats > 1 else "") + ". Payload = bytes the hook all-reduces per rank per step; wire = "
             f"veth tx bytes per rank per step (incl. Gloo/TCP/IP framing).\n\n")
    rows = []
    for (rate, m), r in results.items():
        dense = results.get((rate, "dense"))
        ps = results.get((rate, "powersgd"))
        name = m + (" (auto_dense chose dense)" if (r.get("auto_dense") or {}).get("dense_from_now") else "")
        rows.append([rate, name, f"{r['time'] * 1e3:.1f}", f"{dense['time'] / r['time']:.2f}x" if dense else "-",
                     f"{ps['time'] / r['time']:.2f}x" if ps else "-", f"{r['payload'] / 2**20:.3f}",
                     f"{r['wire'] / 2**20:.3f}"])
    text += cu.md_table(["link", "method", "ms/step", "speed-up vs dense", "speed-up vs PowerSGD",
                         "payload MB/step", "wire MB/step"], rows)
    for rate in args.rates:
        lo, g, d, ps = (results.get((rate, k)) for k in ("lore", "greedylore", "dense", "powersgd"))
        if lo and d and ps:
            # each repeat's ratios (methods of one repeat run back to back), and their median
            vd = [a["time"] / b["time"] for a, b in zip(runs[(rate, "dense")], runs[(rate, "lore")])]
            vp = [a["time"] / b["time"] for a, b in zip(runs[(rate, "powersgd")], runs[(rate, "lore")])]
            md, mp = statistics.median(vd), statistics.median(vp)
            each = (lambda v: f" (repeats: {', '.join(f'{x:.2f}x' for x in v)}; median)") if args.repeats > 1 \
                else (lambda v: "")
            if rate == "1gbit":
                text += (f"\nTargets at 1gbit: Lore vs dense {md:.2f}x{each(vd)} (target >= 3x: "
                         f"{'met' if md >= 3 else 'NOT met'}); vs PowerSGD {mp:.2f}x{each(vp)} (target >= 1x: "
                         f"{'met' if mp >= 1 else 'NOT met'}, stretch 1.3x: {'met' if mp >= 1.3 else 'not met'}).\n")
            else:  # a fast link: where compression does not pay, no slower than dense
                text += (f"\nTarget at {rate} (a fast link: no slower than dense): Lore vs dense {md:.2f}x{each(vd)} "
                         f"({'met' if md >= 1 else 'NOT met'}); vs PowerSGD {mp:.2f}x{each(vp)}.\n")
        autos = [x.get("auto_dense") for x in runs.get((rate, "lore"), [])]
        if any(autos):
            # what auto_dense measured and chose in each repeat (its choice drives Lore's row)
            said = [(f"{'dense' if a['dense_from_now'] else 'compressing'} ({a['compressed_step_s'] * 1e3:.0f} vs "
                     f"{a['dense_step_s'] * 1e3:.0f} ms)") if a and "dense_from_now" in a else "undecided"
                    for a in autos]
            n_dense = sum(s.startswith("dense") for s in said)
            text += (f"\nauto_dense at {rate} chose dense in {n_dense} of {len(said)} repeats (its measured compressed "
                     f"vs dense step, averaged over the ranks): {', '.join(said)}.\n")
        if g and d and args.update_interval > 0:
            amort = g["time"] + (d["time"] - g["time"]) / args.update_interval
            text += (f"\nGreedyLore at {rate}: refresh amortised over update_interval={args.update_interval}: "
                     f"{amort * 1e3:.1f} ms/step ({d['time'] / amort:.2f}x dense).\n")
    if skipped:
        text += f"\nNot run: {'; '.join(skipped)}.\n"
    cu.write_result(args.out, text)
    return results


if __name__ == "__main__":
    main()
