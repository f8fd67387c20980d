"""Shared helpers of the communication microbenchmarks (bench/allreduce.py,
bench/hook_overhead.py, bench/overlap.py, bench/netem.py).

Launching N local ranks, describing the machine, and writing results as
markdown under bench/results/ with date, commit and machine.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout: import the in-tree lorecomm
    sys.path.insert(1, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def spawn(fn, world_size: int, *args):
    """Run fn(rank, world_size, port, *args) in world_size processes (spawn)."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(fn, args=(world_size, port) + tuple(args), nprocs=world_size, join=True)


def init_pg(rank: int, world_size: int, port: int, backend: str, addr: str = "127.0.0.1",
            timeout_s: float = 120.0):
    import datetime as dt
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", addr)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                            world_size=world_size, timeout=dt.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())


def git_commit() -> str:
    """The checkout's commit (+dirty); LORECOMM_COMMIT when set (a copy without .git, e.g. a GPU machine)."""
    if os.environ.get("LORECOMM_COMMIT"):
        return os.environ["LORECOMM_COMMIT"]
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench", "lorecomm", "csrc"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {dev}; torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def header(title: str, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# {title}\n\n- date: {now}\n- commit: {git_commit()}\n- machine: {machine()}\n"
            f"- command: `{command}`\n")


def md_table(cols: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(out) + "\n"


def write_result(path: str | None, text: str) -> None:
    print(text)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p}", file=sys.stderr)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} GB"


def parse_bytes(s: str) -> int:
    s = s.strip().upper()
    mult = 1
    for suf, m in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("G", 1 << 30),
                   ("M", 1 << 20), ("K", 1 << 10), ("B", 1)):
        if s.endswith(suf):
            mult, s = m, s[: -len(suf)]
            break
    return int(float(s) * mult)
