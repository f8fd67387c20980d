"""Smoke tests of the communication microbenchmarks (bench/*.py): tiny sizes,
each script run the way a user runs it (one command), output checked."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _run(script: str, *args: str, timeout: float = 120) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.mark.parametrize("script", ["allreduce.py", "hook_overhead.py", "overlap.py", "netem.py"])
def test_help(script):
    assert "usage" in _run(script, "--help", timeout=60)


def test_allreduce_smoke(tmp_path):
    out = tmp_path / "ar.md"
    text = _run("allreduce.py", "--max-bytes", "64K", "--iters", "2", "--warmup", "1",
                "--seconds-per-size", "0.05", "--out", str(out))
    assert "busbw" in text and "| 64 KB |" in text
    assert "commit:" in out.read_text()


def test_hook_overhead_smoke():
    text = _run("hook_overhead.py", "--width", "64", "--layers", "2", "--rank", "4", "--warmup", "3",
                "--steps", "2", "--hooks", "powersgd", "lore", "greedylore-sketch-inline")
    assert "| powersgd |" in text and "| lore |" in text and "| greedylore-sketch-inline |" in text


def test_overlap_smoke():
    text = _run("overlap.py", "--sizes", "tiny", "--seq", "8", "--batch", "2", "--rank", "4", "--warmup", "3",
                "--steps", "1", "--methods", "dense", "lore", "greedylore-sketch", timeout=180)
    assert "| tiny |" in text and "| lore |" in text and "greedylore-sketch" in text


def _netns_reason():
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2 `{tool}` not installed"
    return None


@pytest.mark.skipif(_netns_reason() is not None, reason=str(_netns_reason()))
def test_netem_smoke():
    text = _run("netem.py", "--rates", "1gbit", "--methods", "dense", "powersgd", "lore", "greedylore", "--width",
                "128", "--layers", "2", "--batch", "4", "--rank", "4", "--warmup", "3", "--steps", "2", "--repeats",
                "2", timeout=300)
    assert "| 1gbit | dense |" in text and "| 1gbit | lore |" in text and "| 1gbit | greedylore |" in text
    assert "every method run 2 times, interleaved" in text, text
    # the targets give each repeat's ratio and their median
    assert re.search(r"Lore vs dense [\d.]+x \(repeats: [\d.]+x, [\d.]+x; median\)", text), text
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "lcnet" not in out, "namespaces left behind"
