"""Real multi-rank training: ``world_size`` local Gloo ranks (torch.multiprocessing, 127.0.0.1).

One process group is spawned per call; inside it every run (method x optimizer) is trained
in turn from the same seed, same data stream, same schedule. Rank 0 shows a progress bar
(tqdm if installed, else a plain progress line) and writes the results as JSON.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from .methods import Method, single_bucket_mb
from .tasks import lr_at, make_optimizer, make_task


class _Progress:
    def __init__(self, total, enabled, desc):
        self.enabled = enabled
        self.total = total
        self.n = 0
        self.bar = None
        self.t0 = time.time()
        self.last = 0.0
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stderr,
                                mininterval=0.5)
            except ImportError:
                self.desc = desc

    def update(self, post: str):
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.n % 10 == 0:
                self.bar.set_postfix_str(post, refresh=False)
        else:
            now = time.time()
            if now - self.last > 2 or self.n == self.total:
                self.last = now
                el = now - self.t0
                eta = el / self.n * (self.total - self.n)
                print(f"\r{self.desc}: {self.n}/{self.total} ({100*self.n/self.total:.0f}%) "
                      f"{el:.0f}s elapsed, ~{eta:.0f}s left | {post}   ", end="", file=sys.stderr,
                      flush=True)

    def close(self):
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            else:
                print(file=sys.stderr)


def _train_one(task, run, rank, world, progress):
    torch.manual_seed(run.get("seed", 0))
    model = task.build_model()
    ddp = DDP(model, bucket_cap_mb=single_bucket_mb(model))
    method = Method(run["method"], ddp, run)
    opt = make_optimizer(ddp.parameters(), run["opt"], run["lr"], run.get("weight_decay", 0.0))
    steps = run["steps"]
    eval_every = run.get("eval_every", max(1, steps // 10))
    losses = torch.zeros(steps, dtype=torch.float64)
    cum_bytes = []
    evals = []
    train_time = 0.0
    step_times = []
    for step in range(steps):
        batch = task.train_batch(rank, world, step)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, run["lr"])
        loss = task.loss(ddp, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.get("clip"):
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), run["clip"])
        opt.step()
        step_times.append(time.perf_counter() - t0)
        train_time += step_times[-1]
        losses[step] = float(loss.detach())
        cum_bytes.append(method.after_step())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            ev = task.evaluate(model)
            ev["step"] = step + 1
            evals.append(ev)
        progress.update(f"{run['label']} loss {losses[step]:.3f}")
    dist.all_reduce(losses)
    losses /= world
    stats = {}
    if method.state is not None and hasattr(method.state, "stats"):
        try:
            stats = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                     for k, v in method.state.stats().items()}
        except Exception:  # noqa: BLE001
            stats = {}
    tt = torch.tensor([train_time], dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    total_bytes = cum_bytes[-1]
    dense_total = method.dense_bytes()
    res = {
        **{k: v for k, v in run.items()},
        "note": method.note,
        "model": task.model_kind,
        "params": sum(p.numel() for p in model.parameters()),
        "losses": losses.tolist(),
        "cum_bytes": cum_bytes,
        "evals": evals,
        "time_per_step": float(tt) / steps,
        "step_times": step_times,
        "bytes_per_step": total_bytes / steps,
        "compression_ratio": dense_total / max(1, total_bytes),
        "stats": stats,
    }
    del ddp, opt
    return res


def _worker(rank, world, port, spec, runs, out_path, show_progress, threads):
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        task = make_task(spec)
        total = sum(r["steps"] for r in runs)
        prog = _Progress(total, show_progress and rank == 0, spec.get("desc", spec["task"]))
        results = []
        for run in runs:
            t0 = time.time()
            res = _train_one(task, run, rank, world, prog)
            res["wall_s"] = time.time() - t0
            results.append(res)
            dist.barrier()
        prog.close()
        if rank == 0:
            out = {"spec": spec, "world_size": world, "data": task.data_info,
                   "model": task.model_kind, "environment": environment(), "runs": results}
            tmp = out_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(out, fh)
            os.replace(tmp, out_path)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def environment():
    """What a raw result depends on beyond its spec: the code (a hash of lorecomm's Python sources and
    built extension, and of this benchmark's sources), the library versions and the CPU. Two files with
    different environments may differ bit for bit (a changed QR rounding, another BLAS path), so
    run_all.py's --resume reuses a raw file only when this matches."""
    import lorecomm

    pkg = os.path.dirname(os.path.abspath(lorecomm.__file__))
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for root, patterns in ((pkg, ("**/*.py", "_C*.so", "_C*.pyd")), (here, ("*.py",))):
        for f in sorted({f for p in patterns for f in glob.glob(os.path.join(root, p), recursive=True)}):
            h.update(os.path.relpath(f, root).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha1(fh.read()).digest())
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = None
    return {"code": h.hexdigest()[:16], "torch": torch.__version__, "transformers": tf,
            "python": platform.python_version(), "cpu": cpu}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(spec, runs, world_size=2, out_path="ddp_results.json", progress=True, threads=None):
    """Train every run in ``runs`` on ``world_size`` Gloo ranks; return the results dict."""
    if threads is None:
        threads = max(1, (os.cpu_count() or 2) // world_size)
    port = free_port()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    mp.spawn(_worker, args=(world_size, port, spec, runs, out_path, progress, threads),
             nprocs=world_size, join=True)
    with open(out_path) as fh:
        return json.load(fh)
