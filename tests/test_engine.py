"""The one runtime: the C++ engine every compressor step runs on (csrc/engine.cpp, lorecomm.engine).

- the C++ tests (ctest, csrc/tests) are built and run from here;
- isolation: lorecomm talks on its own process group, so DDP's
  find_unused_parameters, autograd collectives in the model, two models with
  two states in one backward, and collectives in the training loop all train
  with identical replicas, equal to the same run with the engine inline;
- ranks whose configurations differ get a ValueError naming the difference;
- both ranks issue the same collectives in the same order (the engine's own log);
- the worker overlaps bucket k with the backward pass of later buckets;
- errors: a dead peer fails the future within the timeout, a bad tensor names
  itself, a failed engine can be reset, exit never hangs on a stuck worker,
  stats()/state_dict() from a future callback raise instead of deadlocking.
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- C++ tests
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_ctest_engine():
    """Configure/build csrc/tests (incrementally, in build/engine-tests) and run ctest."""
    bdir = ROOT / "build" / "engine-tests"
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not (bdir / "Makefile").exists() else []
    if not (bdir / "CMakeCache.txt").exists():
        r = subprocess.run(["cmake", "-S", str(ROOT / "csrc" / "tests"), "-B", str(bdir), *gen,
                            f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    jobs = os.environ.get("MAX_JOBS", "1")
    r = subprocess.run(["cmake", "--build", str(bdir), "-j", jobs], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    r = subprocess.run(["ctest", "--test-dir", str(bdir), "--output-on-failure"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]


# ------------------------------------------------ isolation: the four setups
class Branchy(torch.nn.Module):
    """Two paths; `use_b=False` leaves path b unused (find_unused_parameters)."""

    def __init__(self):
        super().__init__()
        self.a1 = torch.nn.Linear(24, 48)
        self.a2 = torch.nn.Linear(48, 40)
        self.b1 = torch.nn.Linear(24, 40)
        self.head = torch.nn.Linear(40, 6)

    def forward(self, x, use_b=True, gather=False):
        h = self.a2(torch.relu(self.a1(x)))
        if use_b:
            h = h + self.b1(x)
        if gather:  # an autograd collective: its backward communicates during DDP's backward
            import torch.distributed.nn.functional as dfn

            h = torch.cat(dfn.all_gather(h), 0)
        return self.head(h)


def _flat(models):
    return torch.cat([p.detach().reshape(-1) for m in models for p in m.parameters()])


def _train_setup(rank, world, setup, inline, compressor):
    import lorecomm
    import lorecomm.engine as le

    le.set_inline(inline)
    torch.manual_seed(0)
    n_models = 2 if setup == "two_models" else 1
    models = [Branchy() for _ in range(n_models)]
    ddps = [DDP(m, bucket_cap_mb=0.01, find_unused_parameters=(setup == "unused")) for m in models]
    cfg = dict(rank=4, start_step=2)
    if compressor == "greedylore":
        cfg.update(compressor="greedylore", update_interval=3)
    states = [lorecomm.register(d, **cfg) for d in ddps]
    opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.05)
    g = torch.Generator().manual_seed(rank)
    for step in range(7):
        x = torch.randn(8, 24, generator=g)
        opt.zero_grad()
        use_b = setup != "unused" or step % 2 == 0
        loss = sum(d(x, use_b=use_b, gather=(setup == "autograd")).square().mean() for d in ddps)
        loss.backward()
        opt.step()
        if setup == "loop_collective":  # the training loop talks on the default group between steps
            t = torch.tensor([loss.item()])
            dist.all_reduce(t)
    stats = [s.stats() for s in states]
    le.set_inline(None)
    return _flat(models), stats


@pytest.mark.parametrize("setup", ["unused", "autograd", "two_models", "loop_collective"])
def test_isolated_setups_train_identically_and_equal_inline(setup):
    from distributed import run_ranks

    worker = run_ranks(_train_setup, 2, setup, False, "lore")
    inline = run_ranks(_train_setup, 2, setup, True, "lore")
    assert torch.equal(worker[0][0], worker[1][0]), f"{setup}: replicas differ"
    assert torch.equal(worker[0][0], inline[0][0]), f"{setup}: the engine's worker differs from inline"
    for st in worker[0][1]:
        assert st["steps_by_phase"]["compressed"] == 5 and st["compressed_matrices"] >= 2, st


def test_two_greedylore_models_share_one_engine_in_one_order():
    from distributed import run_ranks

    res = run_ranks(_train_setup, 2, "two_models", False, "greedylore")
    assert torch.equal(res[0][0], res[1][0])
    assert all(st["steps_by_phase"]["refresh"] >= 1 for st in res[0][1])


# ------------------------------------------------------- agreement check
def _disagree(rank, world):
    import lorecomm

    torch.manual_seed(0)
    ddp = DDP(Branchy(), bucket_cap_mb=0.01)
    lorecomm.register(ddp, rank=4 if rank == 0 else 8, start_step=1)
    try:
        ddp(torch.randn(4, 24)).sum().backward()
        return "no error"
    except ValueError as e:
        return str(e)


def test_ranks_with_different_configs_get_a_clear_error():
    from distributed import run_ranks

    for msg in run_ranks(_disagree, 2):
        assert "rank: 4 on rank 0, 8 on rank 1" in msg, msg


# --------------------------------------------- order of collectives (observed)
def _order(rank, world):
    import lorecomm
    import lorecomm.engine as le

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    ddp = DDP(model, bucket_cap_mb=0.03)  # several buckets
    state = lorecomm.register(ddp, rank=4, start_step=1)
    eng = state._runtime().engine
    eng.set_logging(True)
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        ddp(torch.randn(8, 64, generator=g)).square().mean().backward()
    state.stats()  # drains
    log = eng.collective_log(True)
    return log, state.stats()["collectives"]


def test_both_ranks_issue_the_same_collectives_in_the_same_order():
    from distributed import run_ranks

    (l0, c0), (l1, c1) = run_ranks(_order, 2)
    assert l0 == l1 and len(l0) == c0 == c1 > 8
    assert {op for op, *_ in l0} == {"all_reduce_sum"}
    assert [w for *_, w in l0].count("sketch") == [w for *_, w in l0].count("factor") > 0


# ------------------------------------------------------- overlap (CPU)
def _overlap(rank, world):
    import lorecomm

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(160, 160) for _ in range(8)])
    ddp = DDP(model, bucket_cap_mb=0.12, gradient_as_bucket_view=True)
    state = lorecomm.LoreState(rank=4, start_step=1).bind(ddp)
    submits = []

    def hook(st, bucket):
        submits.append(time.monotonic())
        return lorecomm.lore_hook(st, bucket)

    ddp.register_comm_hook(state, hook)
    eng = state._runtime().engine
    # a long enough backward per bucket that the worker, given a core, starts bucket 0 before the last arrives
    x = torch.randn(512, 160, generator=torch.Generator().manual_seed(rank))
    overlapped = []
    for step in range(10):
        submits.clear()
        eng.timeline(clear=True)
        ddp(x).square().mean().backward()
        if step >= 2 and len(submits) > 1:
            tl = eng.timeline()
            overlapped.append(tl[0][2] < submits[-1])  # bucket 0 started before the last was handed over
    return overlapped


def test_worker_overlaps_backward():
    from distributed import run_ranks

    for overlapped in run_ranks(_overlap, 2):
        # on a loaded 2-core box the worker may be descheduled on some steps; it must overlap on most
        assert overlapped and sum(overlapped) * 2 > len(overlapped), overlapped


# ----------------------------------------------------------- errors / hangs
def _dead_peer_worker(rank, world, port, q):
    import lorecomm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))
    model = torch.nn.Linear(64, 64)
    state = lorecomm.LoreState(rank=4, start_step=0).bind(model.named_parameters())
    params = list(model.parameters())
    buf = torch.randn(sum(p.numel() for p in params))
    state.reduce(buf, params)
    state.reduce(buf, params)
    if rank == 1:
        os._exit(0)  # the peer dies without a word
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        state.reduce(buf, params)
        q.put(("no error", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001
        q.put((str(e), time.monotonic() - t0))
    t1 = time.monotonic()  # a later bucket fails fast naming the cause, nothing hangs
    try:
        state.reduce(buf, params)
        q.put(("no error", 0))
    except Exception as e:  # noqa: BLE001
        q.put((str(e), time.monotonic() - t1))
    os._exit(0)


def test_dead_peer_fails_future_within_timeout():
    import torch.multiprocessing as mp
    from distributed import free_port

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_dead_peer_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    (msg, dt), (msg2, dt2) = q.get(), q.get()
    assert msg != "no error" and dt < 15, (msg, dt)
    assert "lorecomm engine" in msg and "all_reduce" in msg and "Likely cause" in msg, msg
    assert "earlier bucket failed" in msg2 and dt2 < 5, (msg2, dt2)


def _bad_tensor_then_reset(rank, world):
    import lorecomm
    import lorecomm.engine as le

    w = torch.nn.Parameter(torch.zeros(16, 24))
    state = lorecomm.LoreState(rank=2, start_step=0, min_compression_rate=1.0).bind([("w", w)])
    state.reduce(torch.randn(16 * 24), [w])
    batch = next(iter(state._plans.values())).batches[0]
    good = batch.tensors["E"]
    batch.tensors["E"] = torch.zeros(1, 3, 3)  # a corrupted state tensor: both ranks alike
    try:
        state.reduce(torch.randn(16 * 24), [w])
        first = "no error"
    except Exception as e:  # noqa: BLE001
        first = str(e)
    batch.tensors["E"] = good
    try:
        state.reduce(torch.randn(16 * 24), [w])
        second = "no error"
    except Exception as e:  # noqa: BLE001
        second = str(e)
    le.reset_all()
    state.reduce(torch.randn(16 * 24), [w])  # runs again after every rank reset
    return first, second


def test_bad_tensor_names_itself_and_a_failed_engine_can_be_reset():
    from distributed import run_ranks

    for first, second in run_ranks(_bad_tensor_then_reset, 2):
        assert "bad input" in first and "E must be float32" in first and "bucket 1" in first, first
        assert "earlier bucket failed" in second and "reset" in second, second


def _callback_calls_stats(rank, world):
    import lorecomm

    w = torch.nn.Parameter(torch.zeros(16, 24))
    state = lorecomm.LoreState(rank=2, start_step=0, min_compression_rate=1.0).bind([("w", w)])
    seen = []

    def cb(f):
        for what in ("stats", "state_dict"):
            try:
                getattr(state, what)()
                seen.append((what, "no error"))
            except RuntimeError as e:
                seen.append((what, str(e)))
        return f.value()

    if rank == 1:
        # rank 0's step then waits in its first collective until rank 1 joins: its callback is attached
        # before the future completes, so it runs on the engine's worker (a done future runs it inline)
        time.sleep(0.5)
    state.reduce_async(torch.randn(16 * 24), [w]).then(cb).wait()
    return seen


def test_stats_from_a_future_callback_raise_instead_of_deadlocking():
    from distributed import run_ranks

    seen0, seen1 = run_ranks(_callback_calls_stats, 2)
    for seen in (seen0, seen1):
        assert [w for w, _ in seen] == ["stats", "state_dict"]
    assert all("callback of a lorecomm future" in m for _, m in seen0), seen0
    # rank 1's future may be done before .then(): then the callback runs on the caller, where both work
    assert all("callback of a lorecomm future" in m for _, m in seen1) or \
        all(m == "no error" for _, m in seen1), seen1


_STUCK = textwrap.dedent("""
    import datetime, os, sys, time, torch, torch.distributed as dist
    import lorecomm
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    w = torch.nn.Parameter(torch.zeros(16, 24))
    state = lorecomm.LoreState(rank=2, start_step=0, min_compression_rate=1.0).bind([("w", w)])
    state.reduce(torch.randn(16 * 24), [w])
    if rank == 1:
        time.sleep(90)  # alive but silent: rank 0's next collective waits on it
        os._exit(0)
    state.reduce_async(torch.randn(16 * 24), [w])  # stuck in a collective (the gloo timeout is 120 s)
    time.sleep(0.5)
    print("leaving", flush=True)
""")


def test_exit_never_hangs_on_a_worker_stuck_in_a_collective(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK)
    init = f"file://{tmp_path / 'rdv'}"
    env = dict(os.environ, LORECOMM_SHUTDOWN_GRACE_S="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out0 = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert time.monotonic() - t0 < 45, "exit waited for the stuck collective"
    assert procs[0].returncode == 0 and "leaving" in out0[0], out0


def test_engine_time_limits_from_the_environment_are_checked(monkeypatch):
    import lorecomm.engine as le

    monkeypatch.setenv("LORECOMM_ENGINE_TIMEOUT_S", "2.5")
    assert le._timeout_ms() == 2500
    for bad in ("30s", "-1", "nan"):
        monkeypatch.setenv("LORECOMM_ENGINE_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"LORECOMM_ENGINE_TIMEOUT_S='{bad}' is not a number of seconds >= 0"):
            le._timeout_ms()
    monkeypatch.delenv("LORECOMM_ENGINE_TIMEOUT_S")
    assert le._timeout_ms() == 0
