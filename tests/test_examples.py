"""The integration examples run as documented (torchrun / Lightning's own launcher, 2 CPU ranks)
and print the lorecomm stats line with compressed steps."""
from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed(*mods: str) -> bool:
    for m in mods:
        top = m.split(".")[0]
        if importlib.util.find_spec(top) is None or importlib.util.find_spec(m) is None:
            return False
    return True


EXAMPLES = [
    ("megatron_lore.py", ["--steps", "8", "--overlap"], True, ("megatron.core",)),
    ("deepspeed_lore.py", ["--steps", "8"], True, ("deepspeed",)),
    ("accelerate_lore.py", [], True, ("accelerate",)),
    ("lightning_lore.py", [], False, ("lightning.pytorch",)),
]


@pytest.mark.parametrize("script, args, torchrun, needs", EXAMPLES, ids=[e[0].split("_")[0] for e in EXAMPLES])
def test_example_runs(script, args, torchrun, needs):
    if not _installed(*needs):
        pytest.skip(f"{needs[0]} is not installed (pip install lorecomm[integrations])")
    path = os.path.join(ROOT, "examples", script)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
           if torchrun else [sys.executable])
    # faulthandler and native_stacks.py: an abort prints every thread's Python and C++ stacks (see below)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore",
               PYTHONFAULTHANDLER="1")
    if torchrun:
        cmd.append(os.path.join(ROOT, "tests", "native_stacks.py"))
    p = subprocess.run([*cmd, path, *args], cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    out = p.stdout + p.stderr
    if p.returncode != 0 and "terminate called without an active exception" in out and \
            "replicas identical: True" in p.stdout:
        # torch's, not ours: a Gloo worker thread (ProcessGroupGloo::runLoop) drops its reference to a
        # finished collective's Python-owned tensor while the interpreter finalizes; the GIL acquire
        # in decref_pyobject then aborts (pytorch/pytorch#179291, #190489; the C++ stacks of a CI run
        # on 2026-12-02 show it, for the DeepSpeed example and, the same run, the Lightning one). Rare
        # (2 of ~10 full-suite runs on 2026-12-01, never in 30 direct runs); the test ranks avoid it
        # with os._exit (integrations/_launch.exit_rank), the examples end as users' scripts do.
        # Said, with the stacks, and run once more: a second abort, or any other failure, fails.
        warnings.warn(f"{script} aborted at exit after completing; rerunning once:\n{out[-20000:]}")
        p = subprocess.run([*cmd, path, *args], cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
        out = p.stdout + p.stderr
    assert p.returncode == 0, out[-20000:]  # with native_stacks' C++ stacks on an abort
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{'steps'")]
    assert lines, out[-4000:]
    stats = ast.literal_eval(lines[-1])
    assert stats["steps"] > 0 and stats["calls"] >= stats["steps"]
    assert stats["steps_by_phase"].get("compressed", 0) > 0 and stats["compression_ratio"] > 1.0, stats
    assert "replicas identical: True" in p.stdout, out[-4000:]
