"""The DDP hook end to end, for Lore (the default) and the paper's GreedyLore: buckets, step
counting, dtypes, NaN/Inf, basis identity, bucket re-layouts, resume, misuse."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lorecomm
from distributed import run_ranks


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 24)
        self.conv = torch.nn.Conv2d(2, 12, 3)
        self.fc1 = torch.nn.Linear(24 + 12 * 16, 48)
        self.fc2 = torch.nn.Linear(48, 40)
        self.head = torch.nn.Linear(40, 5)

    def forward(self, tokens, img):
        h = torch.cat([self.embed(tokens), self.conv(img).flatten(1)], 1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def batch(step: int, rank: int, n: int = 8):
    g = torch.Generator().manual_seed(100 * step + rank)
    return (torch.randint(0, 16, (n,), generator=g), torch.randn(n, 2, 6, 6, generator=g),
            torch.randint(0, 5, (n,), generator=g))


COMPRESSORS = ["lore", "greedy"]


def config(kind: str, **cfg) -> dict:
    if kind == "greedy":
        return {**dict(compressor="greedylore", rank=4, update_interval=3, start_step=2, min_compression_rate=1.5),
                **cfg}
    # auto_dense off: these tests hold results to references, not to this machine's timings
    return {**dict(rank=4, start_step=2, min_compression_rate=1.5, auto_dense=False), **cfg}


def make(kind: str, dtype=torch.float32, bucket_cap_mb=0.01, **cfg):
    torch.manual_seed(0)
    model = Net().to(dtype)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)  # several buckets
    state = None
    if kind in COMPRESSORS:
        state = lorecomm.register(ddp, **config(kind, **cfg))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return ddp, state, opt


def train_step(ddp, opt, step, rank, dtype=torch.float32, accumulate=1):
    opt.zero_grad()
    for micro in range(accumulate):
        tokens, img, y = batch(step * 10 + micro, rank)
        ctx = ddp.no_sync() if micro < accumulate - 1 else torch.enable_grad()
        with ctx:
            loss = torch.nn.functional.cross_entropy(ddp(tokens, img.to(dtype)).float(), y)
            loss.backward()
    opt.step()


def flat_params(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _warmup_equals_plain_ddp(rank, world, kind):
    plain, _, opt_p = make("plain")
    ours, state, opt_o = make(kind, start_step=4)
    for step in range(1, 5):
        train_step(plain, opt_p, step, rank)
        train_step(ours, opt_o, step, rank)
    same_warmup = torch.equal(flat_params(plain), flat_params(ours))
    for step in range(5, 12):  # refreshes and compressed steps, 2-step accumulation
        train_step(ours, opt_o, step, rank, accumulate=2)
    return same_warmup, flat_params(ours), state.stats()


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_hook_warmup_is_plain_ddp_then_compresses_with_identical_replicas(kind):
    res = run_ranks(_warmup_equals_plain_ddp, 2, kind)
    assert res[0][0] and res[1][0], "dense warm-up must equal DDP's own all-reduce bit for bit"
    assert torch.equal(res[0][1], res[1][1]), "replicas diverged"
    stats = res[0][2]
    # one step per optimizer step, also with no_sync accumulation; buckets rebuilt after step 1
    assert stats["steps"] == 11
    want = {"dense": 4, "refresh": 3, "compressed": 4} if kind == "greedy" else {"dense": 4, "compressed": 7}
    assert stats["steps_by_phase"] == want
    # conv (12 x 18), fc1 (48 x 216), fc2 (40 x 48) compressed; GreedyLore keeps the embedding dense (by
    # type and name) and finds the head (5 x 40) too small; Lore compresses both, as PowerSGD would at r/2
    assert stats["compressed_matrices"] == (3 if kind == "greedy" else 5)
    assert stats["compression_ratio"] > 1.0


def _dtypes(rank, world, kind, dtype):
    ddp, state, opt = make(kind, dtype=dtype)
    for step in range(1, 8):
        train_step(ddp, opt, step, rank, dtype=dtype)
    return flat_params(ddp), state.stats()


@pytest.mark.parametrize("kind", COMPRESSORS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_buckets(kind, dtype):
    res = run_ranks(_dtypes, 2, kind, dtype)
    assert torch.equal(res[0][0], res[1][0])
    assert torch.isfinite(res[0][0]).all()
    assert res[0][1]["steps_by_phase"]["compressed"] >= 3


def _two_states(kind, shapes, **kw):
    """Parameters of the given (name, shape)s and two equally configured states bound to them."""
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
    named = [(n, p) for (n, _), p in zip(shapes, ps)]
    cls = lorecomm.GreedyLoreState if kind == "greedy" else lorecomm.LoreState
    kw = dict(dict(rank=3, start_step=1, min_compression_rate=1.0), **kw)
    if kind != "greedy":
        kw.pop("update_interval", None)
        kw.setdefault("auto_dense", False)
    return ps, cls(**kw).bind(named), cls(**kw).bind(named)


def _half_vs_fp32(rank, world, kind, dtype):
    """The same gradients (representable in dtype) through a dtype bucket and an fp32 bucket.

    (Lore starts compressing at once: its last warm-up step seeds the tracker from the mean
    gradient, which DDP's warm-up averages in the bucket's dtype.)"""
    extra = dict(update_interval=3) if kind == "greedy" else dict(start_step=0)
    ps, half, full = _two_states(kind, [("w", (16, 24)), ("b", (16,))], **extra)
    g = torch.Generator().manual_seed(rank)
    out = []
    for t in range(1, 8):
        bh = torch.randn(16 * 24 + 16, generator=g).to(dtype)
        bf = bh.float()
        half.reduce(bh, ps)
        full.reduce(bf, ps)
        out.append((half.phase(t), bh, bf, half._param_tensors()["w"]["E"].clone(), full._param_tensors()["w"]["E"].clone()))
    return out


@pytest.mark.parametrize("kind", COMPRESSORS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bucket_is_the_fp32_result_rounded(kind, dtype):
    for phase, bh, bf, eh, ef in run_ranks(_half_vs_fp32, 2, kind, dtype)[0]:
        assert eh.dtype == torch.float32, "error buffers are fp32 whatever the bucket dtype"
        if phase == "dense":  # warm-up: DDP's own all-reduce in the bucket dtype
            torch.testing.assert_close(bh.float(), bf, rtol=1e-2, atol=1e-2)
            continue
        # refresh and compressed steps compute in fp32 and round once into the bucket
        assert torch.equal(bh, bf.to(dtype)), f"{phase}: the {dtype} bucket is not the fp32 result rounded"
        assert torch.equal(eh, ef), f"{phase}: error buffers differ between the {dtype} and fp32 buckets"


# --- NaN / Inf -------------------------------------------------------------------
# Two buckets per step: [w (compressed) | b (dense leftover)] and [v (compressed)].
# (step, bucket, position) of the non-finite values rank 1 puts in:
_POISON = {
    3: [(0, 7, float("nan"))],                      # compressed step, in w
    5: [(0, 7, float("inf")), (1, 11, float("nan"))],  # both buckets of one step: one skipped step
    6: [(0, 7, float("-inf"))],                     # refresh step (t = 2, 6, 10), in w
    8: [(0, 16 * 24 + 3, float("nan"))],            # compressed step, only in the dense bias
    10: [(0, 16 * 24 + 5, float("inf"))],           # refresh step, only in the dense bias
}


def _nonfinite(rank, world, kind, inline):
    import lorecomm.engine as le

    le.set_inline(inline)
    params = [("w", (16, 24)), ("b", (16,)), ("v", (16, 24))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in params]
    named = [(n, p) for (n, _), p in zip(params, ps)]
    if kind == "greedy":
        state = lorecomm.GreedyLoreState(rank=3, update_interval=4, start_step=1, min_compression_rate=1.0)
    else:
        state = lorecomm.LoreState(rank=3, start_step=1, min_compression_rate=1.0, explore=0.5, auto_dense=False)
    state.bind(named)
    g = torch.Generator().manual_seed(rank)
    report = {}
    for t in range(1, 12):
        bufs = [torch.randn(16 * 24 + 16, generator=g), torch.randn(16 * 24, generator=g)]
        for bucket, pos, value in _POISON.get(t, []):
            if rank == 1:
                bufs[bucket][pos] = value
        before = {f"{n}.{k}": v.clone() for n in ("w", "v") for k, v in state._param_tensors().get(n, {}).items()}
        futs = [state.reduce_async(bufs[0], ps[:2], None, False), state.reduce_async(bufs[1], ps[2:], None, True)]
        for f in futs:
            f.wait()
        after = {f"{n}.{k}": v for n in ("w", "v") for k, v in state._param_tensors().get(n, {}).items()}
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        report[t] = (state.phase(t), [bool(torch.isfinite(b).all()) for b in bufs], changed)
    le.set_inline(None)
    return report, state.stats()["nonfinite_steps"]


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "inline"])
@pytest.mark.parametrize("kind", COMPRESSORS)
def test_nonfinite_gradients_pass_through_and_leave_state_untouched(kind, inline):
    res = run_ranks(_nonfinite, 2, kind, inline)
    for rank in range(2):
        report, skipped = res[rank]
        want = ["compressed", "refresh", "compressed", "refresh"] if kind == "greedy" else ["compressed"] * 4
        assert [report[t][0] for t in (3, 6, 8, 10)] == want
        for t, poison in _POISON.items():
            phase, finite, changed = report[t]
            for bucket, _, _ in poison:
                assert not finite[bucket], \
                    f"step {t} ({phase}): the non-finite gradient must reach the optimizer on every rank"
            bad = {n for bucket, _, _ in poison for n in (("w",) if bucket == 0 else ("v",))}
            hit = {k for k in changed if k.split(".")[0] in bad}
            assert not hit, f"step {t} ({phase}): state of a non-finite bucket changed: {hit}"
        for t in (4, 7, 9, 11):
            assert all(report[t][1]), f"step {t}: training must recover after a skipped step"
            assert report[t][2], f"step {t}: the state must update again"
        assert skipped == len(_POISON), "nonfinite_steps counts steps, not buckets"


# --- basis identity ----------------------------------------------------------------
def _perturbed_basis(rank, world):
    params = [("w", (16, 24)), ("v", (16, 24))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in params]
    state = lorecomm.GreedyLoreState(rank=3, update_interval=3, start_step=1,
                                     min_compression_rate=1.0).bind([(n, p) for (n, _), p in zip(params, ps)])
    if rank == 1:  # this rank's eigensolver "disagrees" in the last bits, inside the engine's op call
        lib = torch.library.Library("lorecomm", "IMPL")

        def perturbed(H):
            h = H.double().nan_to_num(0.0, 0.0, 0.0)
            return (torch.linalg.eigh(h @ h.mT).eigenvectors.flip(-1) * (1 + 1e-6)).float()

        lib.impl("refresh_basis", perturbed, "CPU")
    g = torch.Generator().manual_seed(0)
    bytes_before_refresh = None
    for t in range(1, 6):
        if t == 2:
            bytes_before_refresh = state.stats()["bytes_sent"]
        state.reduce(torch.randn(2 * 16 * 24, generator=g) + rank, ps)
        if t == 2:
            refresh_bytes = state.stats()["bytes_sent"] - bytes_before_refresh
    U = torch.stack([state._param_tensors()[n]["U"] for n in ("w", "v")])
    repairs = state.stats()["repairs"]
    # on demand: a basis that drifted on one rank between refreshes is found and repaired
    if rank == 1:
        state._param_tensors()["v"]["U"][0, 0] += 1e-3
    on_demand = (state.check_consistency(), state.check_consistency())
    U_after = torch.stack([state._param_tensors()[n]["U"] for n in ("w", "v")])
    return U, repairs, refresh_bytes, on_demand, U_after


def test_perturbed_basis_is_detected_and_repaired():
    res = run_ranks(_perturbed_basis, 2)
    assert torch.equal(res[0][0], res[1][0]), "bases differ after the consistency check"
    # refreshes at t = 2 and 5; each time the one batch (two same-shape matrices) is repaired
    assert res[0][1] == 2 and res[1][1] == 2
    # check_consistency(): one repair, then nothing left to repair; rank 0's basis wins
    assert res[0][3] == res[1][3] == (1, 0)
    assert torch.equal(res[0][4], res[1][4]) and torch.equal(res[0][4], res[0][0])
    numel = 2 * 16 * 24
    assert res[0][2] == 4 * numel + 2 * 2 * 8 + 2 * 16 * 16 * 4  # refresh + checksums + broadcast


def _lore_drifted_warm_start(rank, world):
    params = [("w", (16, 24)), ("v", (16, 24))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in params]
    state = lorecomm.LoreState(rank=3, start_step=1, min_compression_rate=1.0, auto_dense=False).bind(
        [(n, p) for (n, _), p in zip(params, ps)])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        state.reduce(torch.randn(2 * 16 * 24, generator=g) + rank, ps)
    (Q,) = [b.tensors["Q"] for p in state._plans.values() for b in p.batches]
    before = Q.clone()
    if rank == 1:  # this rank's warm start drifted (as a bit flip or a non-deterministic kernel would)
        Q[1, 0, 0] += 1e-3
    found = (state.check_consistency(), state.check_consistency())
    return before, Q.clone(), found, state.stats()["repairs"]


def test_lore_warm_start_drift_is_detected_and_repaired():
    res = run_ranks(_lore_drifted_warm_start, 2)
    assert torch.equal(res[0][0], res[1][0]), "Lore's warm start must be bit-identical before the drift"
    # one batch (two same-shape matrices) repaired, then nothing left; rank 0's factors win
    assert res[0][2] == res[1][2] == (1, 0)
    assert res[0][3] == res[1][3] == 1, "stats()['repairs'] counts check_consistency()'s repairs"
    assert torch.equal(res[0][1], res[1][1]) and torch.equal(res[1][1], res[0][0])


# --- bucket re-layout -------------------------------------------------------------------
def _relayout(rank, world, kind):
    """The same gradients through one fixed bucket and through a layout that changes mid-run,
    on a compressed step (two buckets in another order, then one): the state (E, and U or Q)
    follows the parameters, not the buckets, and the old layout's copy is dropped."""
    shapes = [("w1", (16, 24)), ("b", (16,)), ("w2", (16, 24)), ("w3", (20, 12))]
    ps, fixed, moving = _two_states(kind, shapes, update_interval=4)
    g = torch.Generator().manual_seed(rank)
    same = []
    for t in range(1, 10):
        grads = [torch.randn(s, generator=g) for _, s in shapes]
        one = torch.cat([x.reshape(-1) for x in grads])
        fixed.reduce(one, ps)
        if t <= 3:  # two buckets: [w3, w1] then [b, w2]; one bucket from t = 4, a compressed step
            layout = [[3, 0], [1, 2]]
        else:
            layout = [[0, 1, 2, 3]]
        out = {}
        for i, idx in enumerate(layout):
            buf = torch.cat([grads[j].reshape(-1) for j in idx])
            moving.reduce(buf, [ps[j] for j in idx], None, i == len(layout) - 1)
            for j, piece in zip(idx, buf.split([grads[j].numel() for j in idx])):
                out[j] = piece
        got = torch.cat([out[j] for j in range(len(shapes))])
        same.append(torch.equal(one, got))
    fs, ms = fixed.stats(), moving.stats()
    return same, fs["steps_by_phase"], ms["steps_by_phase"], fs["state_bytes"], ms["state_bytes"], fixed.phase(4)


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_state_follows_parameters_across_bucket_relayouts(kind):
    for same, a, b, fixed_bytes, moving_bytes, phase4 in run_ranks(_relayout, 2, kind):
        assert phase4 == "compressed"
        assert a == b and a["compressed"] >= 4, (a, b)
        assert kind != "greedy" or a["refresh"] >= 2, a
        assert all(same), f"per-step results differ after a bucket re-layout: {same}"
        assert moving_bytes == fixed_bytes > 0, "the superseded layout's state must be dropped"


def _lore_state_memory(rank, world):
    """Lore on 6 x Linear(256) under real DDP (small buckets, rebuilt after the first step)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lorecomm

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    ddp = DDP(model, bucket_cap_mb=0.5)
    state = lorecomm.register(ddp, rank=16, start_step=2, auto_dense=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        opt.zero_grad()
        ddp(torch.randn(8, 256, generator=g)).square().mean().backward()
        opt.step()
    grad_bytes = sum(4 * p.numel() for p in model.parameters())
    return state.stats(), grad_bytes


def test_lore_state_is_at_most_1_5x_the_gradient_after_a_bucket_rebuild():
    # issue 11: 4.0x was measured for this model before (E, a full a x a basis, stale plans)
    for st, grad_bytes in run_ranks(_lore_state_memory, 2):
        assert st["steps_by_phase"].get("compressed", 0) >= 4, st["steps_by_phase"]
        assert st["compressed_matrices"] == 6
        assert 0 < st["state_bytes"] <= 1.5 * grad_bytes, (st["state_bytes"], grad_bytes)


# --- checkpoint and resume -------------------------------------------------------------
def _resume(rank, world, kind, ckpt_dir, split):
    def run(steps, load=False):
        ddp, state, opt = make(kind)
        if load:
            state.load_state_dict(torch.load(os.path.join(ckpt_dir, f"lorecomm{rank}.pt")))
            opt.load_state_dict(torch.load(os.path.join(ckpt_dir, f"opt{rank}.pt")))
            ddp.module.load_state_dict(torch.load(os.path.join(ckpt_dir, f"model{rank}.pt")))
        for step in steps:
            train_step(ddp, opt, step, rank)
        return ddp, state, opt

    straight = flat_params(run(range(1, 12))[0])
    ddp, state, opt = run(range(1, split + 1))
    torch.save(state.state_dict(), os.path.join(ckpt_dir, f"lorecomm{rank}.pt"))
    torch.save(opt.state_dict(), os.path.join(ckpt_dir, f"opt{rank}.pt"))
    torch.save(ddp.module.state_dict(), os.path.join(ckpt_dir, f"model{rank}.pt"))
    dist.barrier()
    ddp2, state2, _ = run(range(split + 1, 12), load=True)
    return straight, flat_params(ddp2), state2.stats()["steps"]


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_checkpoint_resume_mid_period_is_bit_exact(kind):
    # GreedyLore: start_step 2, tau 3: refreshes at 3, 6, 9; stop after step 4 (mid-period), resume
    # across 6 and 9. Lore: the warm start Q and E carry over.
    with tempfile.TemporaryDirectory() as d:
        res = run_ranks(_resume, 2, kind, d, 4)
    for straight, resumed, steps in res:
        assert steps == 11
        assert torch.equal(straight, resumed), "resumed run differs from the uninterrupted one"


def _world_size_change(rank, world, path):
    params = [("w", (16, 24))]
    ps = [torch.nn.Parameter(torch.zeros(16, 24))]
    state = lorecomm.GreedyLoreState(rank=2).bind([("w", ps[0])])
    if world == 2:
        state.reduce(torch.randn(16 * 24), ps)
        if rank == 0:
            torch.save(state.state_dict(), path)
        return None
    try:
        state.load_state_dict(torch.load(path))
    except ValueError as e:
        return str(e)
    return "no error"


def _other_model(rank, world, path):
    ps = [torch.nn.Parameter(torch.zeros(16, 24))]
    saved = lorecomm.GreedyLoreState(rank=2).bind([("w", ps[0])])
    saved.reduce(torch.randn(16 * 24), ps)
    sd = saved.state_dict()
    other = lorecomm.GreedyLoreState(rank=2).bind([("encoder.w", torch.nn.Parameter(torch.zeros(16, 24)))])
    try:
        other.load_state_dict(sd)
    except ValueError as e:
        return str(e), other.step
    return "no error", other.step


def test_loading_another_models_state_fails_clearly():
    msg, step = run_ranks(_other_model, 1, None)[0]
    assert "1 parameter(s) this model does not have" in msg and "w" in msg, msg
    assert step == 0, "a refused load must leave the state untouched"


def test_loading_with_another_world_size_fails_clearly():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.pt")
        run_ranks(_world_size_change, 2, path)
        msg = run_ranks(_world_size_change, 1, path)[0]
    assert "world size 2" in msg and "1 ranks" in msg


# --- validation and misuse ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(update_interval=0), "update_interval must be an integer >= 1"),
    (dict(start_step=-1), "start_step must be an integer >= 0"),
    (dict(min_compression_rate=0), "min_compression_rate must be a number > 0"),
    (dict(selection="topk"), "selection must be one of 'greedy', 'fixed', 'random'"),
    (dict(probes="many"), "probes must be one of 'paper', 'sketch'"),
    (dict(sketch_size=0), "sketch_size must be an integer >= 1"),
    (dict(error_feedback="yes"), "error_feedback must be True or False"),
    (dict(seed=-3), "seed must be an integer >= 0"),
    (dict(dense_name_patterns="embed"), "dense_name_patterns must be a sequence of strings"),
    (dict(dense_name_patterns=None), "dense_name_patterns must be a sequence of strings"),
    (dict(process_group="world"), "process_group must be a torch.distributed.ProcessGroup"),
])
def test_invalid_configuration_names_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        lorecomm.GreedyLoreState(**kwargs)


def test_misuse_of_the_entry_points_names_the_argument_and_the_fix():
    from lorecomm.plan import build_plan
    from lorecomm.simulate import SimulatedRandomLinear

    w = torch.nn.Parameter(torch.zeros(4, 4))
    state = lorecomm.LoreState(rank=2).bind([("w", w)])
    with pytest.raises(ValueError, match=r"contiguous 1-D gradient tensor, got a 2-D tensor: pass the flat bucket"):
        state.reduce(torch.zeros(4, 4), [w])
    with pytest.raises(ValueError, match=r"'w' \(elements 0..16\) and 'v' \(from 8\) overlap .* check the offsets"):
        build_plan(32, [(0, "w", (4, 4), 0), (1, "v", (4, 4), 8)], lambda m, n, name, pid: 2)
    with pytest.raises(ValueError, match="kind must be one of 'randk', 'haar', 'gaussian'"):
        SimulatedRandomLinear(2, [("w", (4, 4))], kind="gauss")
    with pytest.raises(TypeError, match="state must be one of LoreState, GreedyLoreState"):
        lorecomm.hook_for(object())


def test_numpy_integers_and_floats_are_accepted():
    import numpy as np

    st = lorecomm.GreedyLoreState(rank=np.int64(8), update_interval=np.int32(50), start_step=np.int64(0),
                                  min_compression_rate=np.float32(1.5))
    assert (st.rank, st.update_interval, st.start_step) == (8, 50, 0) and type(st.rank) is int
    assert st.min_compression_rate == 1.5


@pytest.mark.parametrize("kwargs, needle", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=4, compression=8), "give either rank=r"),
    (dict(compression=0.5), "compression must be"),
    (dict(explore=2), "explore must be a probability"),
    (dict(explore=True), "explore must be a probability"),
    (dict(wire=torch.int8), "wire must be one of"),
    (dict(start_step=-1), "start_step must be an integer >= 0"),
    (dict(grad_scaler="scaler"), "grad_scaler must be a torch.amp.GradScaler"),
])
def test_invalid_lore_configuration_names_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        lorecomm.LoreState(**kwargs)


def test_register_names_the_compressors_and_their_keywords():
    ddp = DDP.__new__(DDP)  # no process group needed: refused before
    ddp.process_group = None
    with pytest.raises(ValueError, match="compressor must be one of 'lore', 'greedylore'"):
        lorecomm.register(ddp, compressor="topk")
    with pytest.raises(ValueError, match=r"compressor='greedylore' \(GreedyLoreState\) takes no compression; "
                                         r"it takes process_group, rank, update_interval"):
        lorecomm.register(ddp, compressor="greedylore", compression=8)
    with pytest.raises(ValueError, match="pass either state= or config keywords, not both"):
        lorecomm.register(ddp, state=lorecomm.LoreState(), compressor="greedylore")


def _state_on_another_group(rank, world):
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    ddp = DDP(torch.nn.Linear(4, 4), process_group=singles[rank])
    try:
        lorecomm.register(ddp, state=lorecomm.LoreState(rank=2))  # the default group: both ranks
    except ValueError as e:
        return str(e)


def test_register_refuses_a_state_on_another_group_than_ddps():
    for msg in run_ranks(_state_on_another_group, 2):
        assert msg is not None and "is not the DDP model's data-parallel group" in msg, msg


def test_random_linear_and_dense_validation():
    with pytest.raises(ValueError, match="kind must be one of 'randk', 'haar', 'gaussian'"):
        lorecomm.RandomLinearState(kind="sparse")
    with pytest.raises(ValueError, match="dtype must be one of"):
        lorecomm.DenseState(dtype=torch.int8)


def test_register_refuses_a_model_that_is_not_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        lorecomm.register(torch.nn.Linear(3, 3), rank=2)


def test_hook_refuses_wrong_state_and_non_bucket():
    with pytest.raises(TypeError, match="GreedyLoreState"):
        lorecomm.greedylore_hook(lorecomm.DenseState(), None)
    with pytest.raises(TypeError, match="GradBucket"):
        lorecomm.greedylore_hook(lorecomm.GreedyLoreState(), torch.zeros(3))


def test_state_cannot_serve_two_models():
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    state = lorecomm.GreedyLoreState().bind(first)
    state.bind(first)  # re-binding the same model is fine
    with pytest.raises(RuntimeError, match="already bound to another model"):
        state.bind(second)


def _plain_register_comm_hook(rank, world, kind):
    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=0.01)
    if kind == "greedy":
        state = lorecomm.GreedyLoreState(rank=4, update_interval=3, start_step=1, min_compression_rate=1.5)
    else:
        state = lorecomm.LoreState(rank=4, start_step=1, min_compression_rate=1.5, auto_dense=False)
    # torch's own convention, no lorecomm.register
    ddp.register_comm_hook(state, lorecomm.hook_for(state))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(1, 5):
        train_step(ddp, opt, step, rank)
    return state.stats()


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_plain_register_comm_hook_finds_its_model(kind):
    stats = run_ranks(_plain_register_comm_hook, 2, kind)[0]
    assert stats["steps"] == 4 and stats["compressed_matrices"] == (3 if kind == "greedy" else 5)


# --- AMP loss scaling, fp16 overflow ---------------------------------------------------------
def _loss_scaled(rank, world, kind):
    """The same gradients, once plain and once multiplied by a GradScaler's changing scale: the
    scaled run's outputs are the plain ones times the scale, and its error buffers stay equal
    (unscaled units), across scale changes."""
    shapes = [("w", (16, 24)), ("b", (16,))]
    ps, plain, scaled = _two_states(kind, shapes, update_interval=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as the first scaled backward does
    scaled.grad_scaler = scaler
    g = torch.Generator().manual_seed(rank)
    same = []
    for t, scale in enumerate([2.0 ** 10, 2.0 ** 10, 2.0 ** 9, 2.0 ** 12, 2.0 ** 12, 2.0 ** 3], start=1):
        scaler._scale.fill_(scale)
        grad = torch.randn(16 * 24 + 16, generator=g)
        a, b = grad.clone(), grad * scale
        plain.reduce(a, ps)
        scaled.reduce(b, ps)
        ea, eb = plain._param_tensors()["w"]["E"], scaled._param_tensors()["w"]["E"]
        same.append(bool(torch.allclose(b / scale, a, rtol=1e-5, atol=1e-6)) and bool(torch.allclose(ea, eb, atol=1e-6)))
    return same


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_error_buffers_stay_in_unscaled_units_across_loss_scale_changes(kind):
    for same in run_ranks(_loss_scaled, 2, kind):
        assert all(same), same


def _fp16_overflow(rank, world, kind):
    """An fp16 bucket whose decompressed values overflow counts as non-finite and leaves E untouched."""
    ps, state, _ = _two_states(kind, [("w", (8, 12))], rank=8, start_step=0, update_interval=100,
                               min_compression_rate=0.3)
    if kind == "greedy":
        state.start_step = 1
    buf = (0.01 * torch.randn(8 * 12, generator=torch.Generator().manual_seed(rank))).half()
    state.reduce(buf.clone(), ps)  # places the state
    E = state._param_tensors()["w"]["E"]
    E[0, 0] = 70000.0  # H = G + E beyond fp16's range at one element: the output overflows
    before = E.clone()
    out = buf.clone()
    state.reduce(out, ps)
    return bool(torch.isfinite(out).all()), torch.equal(state._param_tensors()["w"]["E"], before), \
        state.stats()["nonfinite_steps"]


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_fp16_bucket_that_overflows_is_non_finite_and_keeps_E(kind):
    for finite, e_kept, skipped in run_ranks(_fp16_overflow, 2, kind):
        assert not finite and e_kept and skipped == 1, (finite, e_kept, skipped)


def _fp16_wire_overflow(rank, world):
    """An fp32 bucket on Lore's fp16 wire whose factors overflow while its sketch does not (Q, from
    the last small gradient, is small beside the new H) counts as non-finite and keeps E and Q."""
    ps, state, _ = _two_states("lore", [("w", (8, 12))], start_step=0, wire=torch.float16)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):  # the second step's Q is its Rbar: about 0.03 per entry
        state.reduce(0.01 * torch.randn(8 * 12, generator=g), ps)
    ts = state._param_tensors()["w"]
    ts["E"][0, 0] = 3e5  # the sketch's entries ~ 1e4 fit fp16; R's ~ 3e5 does not
    before = {k: ts[k].clone() for k in ("E", "Q")}
    out = 0.01 * torch.randn(8 * 12, generator=g)
    state.reduce(out, ps)
    kept = {k: torch.equal(state._param_tensors()["w"][k], before[k]) for k in before}
    return bool(torch.isfinite(out).all()), kept, state.stats()["nonfinite_steps"]


def test_fp16_wire_whose_factors_overflow_is_non_finite_and_keeps_E_and_Q():
    for finite, kept, skipped in run_ranks(_fp16_wire_overflow, 2):
        assert not finite and all(kept.values()) and skipped == 1, (finite, kept, skipped)


# --- dense embeddings by module type; CUDA buckets on a CPU build ---------------------------------
class TokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(40, 16)        # no dense name pattern matches "tok"
        self.mix = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 40, bias=False)  # an untied head: the embedding's shape

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.tok(ids))))


def test_embeddings_and_heads_are_found_by_module_type():
    from lorecomm.state import embedding_parameters

    m = TokenModel()
    found = embedding_parameters(m)
    assert found == {id(m.tok.weight), id(m.out.weight)}
    tied = TokenModel()
    tied.out.weight = tied.tok.weight
    assert embedding_parameters(tied) == {id(tied.tok.weight)}
    # an MLP as wide as the positional table has its shape but is no head: it stays compressed
    ctx, d, vocab = 64, 16, 40
    lm = torch.nn.ModuleDict({"tok": torch.nn.Embedding(vocab, d), "pos": torch.nn.Embedding(ctx, d),
                              "up": torch.nn.Linear(d, ctx), "down": torch.nn.Linear(ctx, d),
                              "head": torch.nn.Linear(d, vocab, bias=False)})
    assert lm["up"].weight.shape == lm["pos"].weight.shape
    assert embedding_parameters(lm) == {id(lm["tok"].weight), id(lm["pos"].weight), id(lm["head"].weight)}


def _embedding_dense(rank, world):
    torch.manual_seed(0)
    ddp = DDP(TokenModel())
    state = lorecomm.register(ddp, compressor="greedylore", rank=2, start_step=1, update_interval=5,
                              min_compression_rate=1.0)
    for _ in range(3):
        ddp(torch.randint(0, 40, (4, 5))).sum().backward()
    names = {s.name for p in state._plans.values() for s in p.matrices}
    off = lorecomm.register(DDP(TokenModel()), rank=2, start_step=1, min_compression_rate=1.0,
                            dense_embeddings=False, dense_name_patterns=())
    return names, off.config()["dense_embeddings"]


def test_the_default_filter_keeps_embeddings_dense():
    names, flag = run_ranks(_embedding_dense, 2)[0]
    assert names == {"mix.weight"}, names
    assert flag is False


def test_a_cuda_bucket_on_a_cpu_build_is_refused_when_planned():
    import types

    from lorecomm import _C

    state = lorecomm.LoreState(rank=2)
    fake = types.SimpleNamespace(device=torch.device("cuda", 0))
    if not _C.ENGINE_CUDA:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            state._check_device(fake)


# --- a byte budget instead of a rank -----------------------------------------------------------
def _budget(rank, world, compression):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 32), torch.nn.Linear(32, 200))
    ddp = DDP(model, bucket_cap_mb=0.02)
    state = lorecomm.register(ddp, compression=compression, start_step=2, min_compression_rate=1.0)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        ddp(torch.randn(8, 64, generator=g)).square().mean().backward()
    st = state.stats()
    dense_per_step = sum(p.numel() for p in model.parameters()) * 4
    sent_per_step = st["bytes_by_phase"]["compressed"] / st["steps_by_phase"]["compressed"]
    return dense_per_step / sent_per_step, state.ranks()


@pytest.mark.parametrize("compression", [4, 12])
def test_a_byte_budget_sets_consistent_ranks(compression):
    (c0, ranks0), (c1, ranks1) = run_ranks(_budget, 2, compression)
    assert ranks0 == ranks1 and len(ranks0) == 4, ranks0
    # every byte after warm-up counted (sketch, factors, dense leftovers): at least the asked compression,
    # and close to it (ranks are integers)
    assert compression <= c0 <= 1.6 * compression, (c0, ranks0)


def _rank1_bytes(rank, world, explore):
    w = torch.nn.Parameter(torch.zeros(8, 20))
    state = lorecomm.LoreState(rank=1, start_step=1, explore=explore, min_compression_rate=1.0,
                               auto_dense=False).bind([("w", w)])
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        state.reduce(torch.randn(160, generator=g), [w])
    st = state.stats()
    return st["bytes_by_phase"]["compressed"] / st["steps_by_phase"]["compressed"]


@pytest.mark.parametrize("explore", [0.0, 1.0])
def test_rank_1_exploring_steps_send_what_the_budget_counts(explore):
    """At r = 1 an exploring step's random direction joins the tracked one: one more factor row, which
    the budget of ``compression=`` counts (lore_step_bytes(explore=True))."""
    from lorecomm.plan import lore_step_bytes

    sent = run_ranks(_rank1_bytes, 2, explore)
    assert sent[0] == sent[1] == lore_step_bytes([((8, 20), 1)], 2, explore=explore > 0), sent
    assert lore_step_bytes([((8, 20), 1)], 2, explore=True) == 2 * (8 + 2 * 20)


def test_a_byte_budget_counts_the_extra_row_of_rank_1_exploring_steps():
    """Linear(200, 8) at rank 1 sends 2 (8 + 200) + 16 = 432 bytes a step without exploring, 832 on an
    exploring step; a budget of 643 (compression=10) fits only the first, so it is refused where the
    state explores and met at rank 1 where it does not."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(200, 8))

    with pytest.raises(ValueError, match="compression=10 cannot be reached"):
        lorecomm.LoreState(compression=10).bind(model())
    assert lorecomm.LoreState(compression=10, explore=0.0).bind(model())._budget_ranks["0.weight"] == 1


# --- auto_dense: where compression does not pay, every rank goes dense alike ---------------------
def _measured(comp_ms: float) -> dict:
    """Step timings as auto_dense keeps them (hand-over times), replacing this machine's: the probe's
    dense steps 0.8, 1.0, 1.2 ms apart once settled (median 1 ms; its first AUTO_DENSE_SETTLE
    intervals, the switch, 50 ms: counted, they would make the median 1.2 ms), the compressed ones
    comp_ms apart."""
    settle, probe = lorecomm.LoreState.AUTO_DENSE_SETTLE, lorecomm.LoreState.AUTO_DENSE_PROBE
    assert probe - settle - 1 == 3, "the settled intervals below are three"
    dense = [i * 50e-3 for i in range(settle + 1)]
    for gap in (0.8e-3, 1.0e-3, 1.2e-3):
        dense.append(dense[-1] + gap)
    return {"dense": [(t, []) for t in dense], "compressed": [(i * comp_ms * 1e-3, []) for i in range(8)]}


def _auto_dense(rank, world, comp_ms):
    shapes = [("w1", (16, 24)), ("w2", (20, 30))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
    state = lorecomm.LoreState(rank=2, start_step=3, min_compression_rate=1.0).bind(
        [(n, p) for (n, _), p in zip(shapes, ps)])
    g = torch.Generator().manual_seed(rank)
    out, timed_dense = [], None
    probe = state.start_step + state.AUTO_DENSE_STEPS + 1  # the first of auto_dense's dense steps
    for t in range(1, 20):
        bufs = [torch.randn(16 * 24, generator=g), torch.randn(20 * 30, generator=g)]
        if t == probe + state.AUTO_DENSE_PROBE:
            # the probe's dense steps were timed, the warm-up's were not
            timed_dense = len(state._timed.get("dense", []))
            # this machine's measured step times replaced by a known answer: settled dense steps 1 ms
            # apart, compressed steps comp_ms[rank] apart; the ranks decide on the mean
            state._timed = _measured(comp_ms[rank])
        for i, (buf, p) in enumerate(zip(bufs, ps)):
            state.reduce(buf, [p], None, i == 1)
        out.append((torch.cat(bufs), {n: bool(torch.count_nonzero(ts["E"])) for n, ts in state._param_tensors().items()}))
    return out, state.stats()["auto_dense"], timed_dense, state.stats()["steps_by_phase"]


@pytest.mark.parametrize("comp_ms, dense", [((3.0, 1.0), True), ((1.5, 0.2), False)],
                         ids=["compression-does-not-pay", "rank0-alone-would-go-dense"])
def test_auto_dense_decides_alike_on_every_rank(comp_ms, dense):
    (o0, a0, timed0, phases0), (o1, a1, _, _) = run_ranks(_auto_dense, 2, comp_ms)
    assert a0 == a1 and a0["dense_from_now"] is dense, a0
    assert a0["compressed_step_s"] == pytest.approx(sum(comp_ms) / 2e3) and a0["dense_step_s"] == pytest.approx(1e-3)
    for (b0, _), (b1, _) in zip(o0, o1):
        assert torch.equal(b0, b1), "replicas differ"
    K, D = lorecomm.LoreState.AUTO_DENSE_STEPS, lorecomm.LoreState.AUTO_DENSE_PROBE
    probe = 3 + K + 1  # the probe: D dense steps after K compressed ones, timed (not the warm-up's 3)
    assert timed0 == D, timed0
    decided = probe + D  # the step whose first bucket decides
    for t, (_, nonzero) in enumerate(o0, start=1):
        if 3 < t < probe:
            assert nonzero == {"w1": True, "w2": True}, (t, nonzero)  # compressing: E holds the residual
        elif probe <= t < decided:
            # the probe's dense steps: the error buffers were flushed into the first one
            assert nonzero == {"w1": False, "w2": False}, (t, nonzero)
        elif t >= decided:
            # dense: E stays 0; compressing again: E holds the residual again
            assert nonzero == {"w1": not dense, "w2": not dense}, (t, nonzero)
    # steps sent dense by choice count as dense, from the deciding step on (its first bucket decides,
    # its last, which closes the step, goes dense)
    by_choice = 19 - decided + 1 if dense else 0
    assert phases0["dense"] == 3 + D + by_choice and phases0["compressed"] == 19 - 3 - D - by_choice, phases0


def _auto_dense_resumed(rank, world, save_at):
    shapes = [("w1", (16, 24)), ("w2", (20, 30))]

    def fresh():
        ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
        return lorecomm.LoreState(rank=2, start_step=3, min_compression_rate=1.0).bind(
            [(n, p) for (n, _), p in zip(shapes, ps)]), ps

    state, ps = fresh()
    K, D = state.AUTO_DENSE_STEPS, state.AUTO_DENSE_PROBE
    g = torch.Generator().manual_seed(rank)
    # where auto_dense's timing starts: the warm-up's end, or the resumed step if it had not decided
    origin = 3 if save_at >= 3 + K + 1 + D else max(3, save_at)
    out = []
    for t in range(1, 27):
        if t == save_at + 1:
            sd = state.state_dict()
            state, ps = fresh()
            state.load_state_dict(sd)
        if t == origin + K + 1 + D:  # the deciding step: compressed steps measured 3x the dense ones
            state._timed = _measured(3.0)
        bufs = [torch.randn(16 * 24, generator=g), torch.randn(20 * 30, generator=g)]
        for i, (buf, p) in enumerate(zip(bufs, ps)):
            state.reduce(buf, [p], None, i == 1)
        out.append((torch.cat(bufs), any(bool(torch.count_nonzero(ts["E"])) for ts in state._param_tensors().values())))
    return out, state.stats()["auto_dense"]


@pytest.mark.parametrize("save_at", [20, 6], ids=["after-the-decision", "before-the-decision"])
def test_auto_dense_decision_survives_a_resume(save_at):
    """A run resumed after auto_dense chose dense stays dense (the choice is in state_dict); one
    resumed before the choice times afresh from the resumed step (the timings are not saved)."""
    (o0, a0), (o1, a1) = run_ranks(_auto_dense_resumed, 2, save_at)
    assert a0 == a1 and a0["dense_from_now"] is True, a0
    for (b0, _), (b1, _) in zip(o0, o1):
        assert torch.equal(b0, b1), "replicas differ"
    K, D = lorecomm.LoreState.AUTO_DENSE_STEPS, lorecomm.LoreState.AUTO_DENSE_PROBE
    origin = 3 if save_at == 20 else save_at
    probe = origin + K + 1
    compressing = [t for t, (_, nonzero) in enumerate(o0, start=1) if nonzero]
    # E holds a residual exactly on the compressed steps: after the warm-up until the probe, then never
    assert compressing == list(range(4, probe)), (compressing, probe)


def _auto_dense_edges(rank, world, case):
    """auto_dense where the step ends by end_step() (DeepSpeed ZeRO), where the probe's first
    (flushing) step is non-finite, and where a checkpoint is loaded back into the same state."""
    shapes = [("w1", (16, 24)), ("w2", (20, 30))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
    state = lorecomm.LoreState(rank=2, start_step=3, min_compression_rate=1.0).bind(
        [(n, p) for (n, _), p in zip(shapes, ps)])
    K, D = state.AUTO_DENSE_STEPS, state.AUTO_DENSE_PROBE
    probe = 3 + K + 1
    g = torch.Generator().manual_seed(rank)
    owed, timed, sd = {}, None, None
    # reload: back at step 5 after the choice, run on until the restarted probe's first step (5 + K + 1)
    last = probe + D + 2 + K if case == "reload" else 18
    for t in range(1, last + 1):
        if case == "reload" and t == 6:
            sd = state.state_dict()
        if case == "reload" and t == probe + D + 2:  # after its choice, back to step 5
            state.load_state_dict(sd)
        bufs = [torch.randn(16 * 24, generator=g), torch.randn(20 * 30, generator=g)]
        if case == "nonfinite" and t == probe and rank == 1:
            bufs[1][7] = float("nan")
        for i, (buf, p) in enumerate(zip(bufs, ps)):
            state.reduce(buf, [p], None, is_last=(i == 1 and case != "end_step"))
        if case == "end_step":
            state.end_step()
        if t == probe + D - 1:
            timed = {k: len(v) for k, v in state._timed.items()}
        owed[state.step] = {n: float(ts["E"].norm()) for n, ts in state._param_tensors().items()}
    return owed, timed, state.stats()


@pytest.mark.parametrize("case", ["end_step", "nonfinite", "reload"])
def test_auto_dense_edges(case):
    (owed, timed, st), (owed1, _, st1) = run_ranks(_auto_dense_edges, 2, case)
    K, D = lorecomm.LoreState.AUTO_DENSE_STEPS, lorecomm.LoreState.AUTO_DENSE_PROBE
    probe = 3 + K + 1
    assert st["auto_dense"] == st1["auto_dense"]
    if case == "end_step":
        # the steps ended by end_step() are timed like those closed by is_last=True: a measured choice
        assert timed == {"compressed": K, "dense": D}, timed
        assert set(st["auto_dense"]) == {"compressed_step_s", "dense_step_s", "dense_from_now"}, st["auto_dense"]
    elif case == "nonfinite":
        assert st["nonfinite_steps"] == st1["nonfinite_steps"] == 1
        # the first probe step was skipped: w2 still owes its residual (w1's bucket was finite and flushed);
        # the next dense step sends it
        assert owed[probe]["w1"] == 0 and owed[probe]["w2"] > 0, owed[probe]
        assert owed[probe + 1] == {"w1": 0.0, "w2": 0.0}, owed[probe + 1]
    else:
        # back at step 5 the schedule restarts there; its probe flushes E again (the checkpoint's)
        again = 5 + K + 1
        assert owed[again - 1]["w1"] > 0 and owed[again] == {"w1": 0.0, "w2": 0.0}, (owed[again - 1], owed[again])


def _auto_dense_releases_e(rank, world):
    import gc
    import weakref

    shapes = [("w1", (16, 24)), ("w2", (20, 30))]

    def params():
        return [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]

    ps = params()
    state = lorecomm.LoreState(rank=2, start_step=3, min_compression_rate=1.0).bind(
        [(n, p) for (n, _), p in zip(shapes, ps)])
    decides = 3 + state.AUTO_DENSE_STEPS + 1 + state.AUTO_DENSE_PROBE
    gens = [torch.Generator().manual_seed(r) for r in range(world)]  # every rank's gradients, to check the mean
    held, means, first_E, early = [], [], None, None

    def step(ps):
        bufs = [[torch.randn(16 * 24, generator=g), torch.randn(20 * 30, generator=g)] for g in gens]
        mean = [sum(b[i] for b in bufs) / world for i in range(2)]
        for i, p in enumerate(ps):
            state.reduce(bufs[rank][i], [p], None, i == 1)
        gc.collect()
        held.append(state.stats()["state_bytes"])
        means.append(all(torch.allclose(bufs[rank][i], mean[i], atol=1e-6) for i in range(2)))

    for t in range(1, decides + 4):
        if t == 6:
            early = state.state_dict()  # compressing: E holds residuals
        if t == decides:
            state._timed = _measured(3.0)  # compressed steps 3x the dense ones: dense from now on
            first_E = [weakref.ref(b.tensors["E"]) for p in state._plans.values() for b in p.batches]
        step(ps)
    after = state.state_dict()
    saved = {n: (tuple(ts["E"].shape), bool(torch.count_nonzero(ts["E"]))) for n, ts in after["params"].items()}
    # loaded back into the same state (released E): real buffers again, flushed, released again
    state.load_state_dict(after)
    loaded_same = state.stats()["state_bytes"]
    step(ps), step(ps)
    # bound anew (the buckets' plans are gone, the parameters' released views kept), then loaded
    ps = params()
    state.bind([(n, p) for (n, _), p in zip(shapes, ps)])
    state.load_state_dict(after)
    step(ps), step(ps)
    # a checkpoint from before the choice compresses again, into real buffers
    state.load_state_dict(early)
    step(ps)
    compressing = all(bool(torch.count_nonzero(ts["E"])) for ts in state._param_tensors().values())
    return dict(held=held, means=means, freed=[r() is None for r in first_E], saved=saved, decides=decides,
                loaded_same=loaded_same, compressing=compressing)


def test_auto_dense_gives_the_error_buffers_memory_back_when_it_goes_dense():
    """Dense by choice, E is zero for good: its memory (the gradient's size) is freed, the steps are
    DDP's mean, a checkpoint still holds E (zeros, full shape), and loading one (into the same state,
    after binding again, or one from before the choice) writes into real buffers again."""
    for r in run_ranks(_auto_dense_releases_e, 2):
        held, d = r["held"], r["decides"]  # held[t - 1]: after step t
        E_bytes = 4 * (16 * 24 + 20 * 30)
        full, released = held[d - 2], held[d - 1]
        assert full - released == E_bytes - 2 * 4, held  # one zero element per batch stays
        assert held[d - 1:d + 3] == [released] * 4, held
        assert all(r["freed"]), "the released error buffers are still referenced"
        assert all(r["means"][d - 1:d + 3]), r["means"]  # dense by choice: the mean of the ranks' gradients
        assert r["saved"] == {"w1": ((16, 24), False), "w2": ((20, 30), False)}, r["saved"]
        assert r["loaded_same"] == full, r["loaded_same"]
        # each load: the first dense step flushes the (zero) buffers, the next gives them back again
        assert held[d + 3:d + 7] == [full, released, full, released], held[d + 3:]
        assert all(r["means"][d + 3:d + 7]), r["means"]
        assert r["compressing"] and held[-1] == full, held


def _auto_dense_decision_fails(rank, world):
    """The decision's all-reduce raises (on every rank): nothing is decided, and the step, run again,
    decides on the same timings."""
    shapes = [("w1", (16, 24)), ("w2", (20, 30))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
    state = lorecomm.LoreState(rank=2, start_step=3, min_compression_rate=1.0).bind(
        [(n, p) for (n, _), p in zip(shapes, ps)])
    decides = 3 + state.AUTO_DENSE_STEPS + 1 + state.AUTO_DENSE_PROBE
    g = torch.Generator().manual_seed(rank)

    class Failing:  # an engine whose next collective fails
        class engine:
            @staticmethod
            def submit(step):
                raise RuntimeError("injected all_reduce failure")

    error = None
    for t in range(1, decides + 3):
        bufs = [torch.randn(16 * 24, generator=g), torch.randn(20 * 30, generator=g)]
        if t == decides:  # compressed steps measured 3x the dense ones
            state._timed = _measured(3.0)
            state._runtime = lambda: Failing
            try:
                state.reduce(bufs[0], [ps[0]], None, False)
            except RuntimeError as e:
                error = str(e)
            del state._runtime
        for i, (buf, p) in enumerate(zip(bufs, ps)):
            state.reduce(buf, [p], None, i == 1)
    return error, state.step, state.stats()["auto_dense"]


def test_auto_dense_decides_again_after_its_collective_failed():
    for error, step, auto in run_ranks(_auto_dense_decision_fails, 2):
        assert error == "injected all_reduce failure", error
        decides = 3 + lorecomm.LoreState.AUTO_DENSE_STEPS + 1 + lorecomm.LoreState.AUTO_DENSE_PROBE
        assert step == decides + 2
        assert auto.get("dense_from_now") is True and auto["compressed_step_s"] == pytest.approx(3e-3), auto


def _flush_fails(rank, world):
    """The error flush's submit raises (on every rank): the next dense step flushes again."""
    w = torch.nn.Parameter(torch.zeros(16, 24))
    state = lorecomm.LoreState(rank=2, start_step=3, min_compression_rate=1.0).bind([("w", w)])
    real = lorecomm.LoreState._runtime(state)
    kinds, failed = [], []

    class Engine:  # the real engine, except that the first error flush fails before it runs
        def submit(self, step):
            kinds.append(step.kind)
            if step.kind == "dense (error flush)" and not failed:
                failed.append(len(kinds) - 1)
                raise RuntimeError("injected flush failure")
            return real.engine.submit(step)

        def __getattr__(self, name):
            return getattr(real.engine, name)

    class Runtime:
        engine = Engine()

        def __getattr__(self, name):
            return getattr(real, name)

    state._runtime = lambda rt=Runtime(): rt
    g = torch.Generator().manual_seed(rank)
    for _ in range(3 + state.AUTO_DENSE_STEPS + 3):
        try:
            state.reduce(torch.randn(16 * 24, generator=g), [w], None, True)
        except RuntimeError as e:
            assert "injected flush failure" in str(e), e
    return kinds, failed, [b.tensors["E"].clone() for p in state._plans.values() for b in p.batches]


def test_a_failed_error_flush_is_sent_again():
    for kinds, failed, Es in run_ranks(_flush_fails, 2):
        assert failed, kinds
        f = failed[0]
        assert kinds[f - 1] == "lore compressed" and kinds[f + 1] == "dense (error flush)", kinds
        assert kinds[f + 2] == "dense", kinds  # the retry completed: nothing owed after it
        assert all(torch.count_nonzero(E) == 0 for E in Es)


def _load_before_bind(rank, world):
    w = torch.nn.Parameter(torch.zeros(4, 4))
    saved = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind([("inner.w", w)])
    for _ in range(2):
        saved.reduce(torch.randn(16), [w])
    state = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0)
    state.load_state_dict(saved.state_dict())  # the torch convention: load, then register the hook (binds)
    try:
        state.bind([("w", w)])
    except ValueError as e:
        return str(e)


def test_checkpoint_loaded_before_binding_is_checked_when_bound():
    for msg in run_ranks(_load_before_bind, 2):
        assert msg is not None and "does not have (e.g. inner.w; the model's are e.g. w)" in msg, msg


def _refused_bind(rank, world):
    pa, pb, pc = (torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3))

    def trained(with_c):
        s = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(
            [("a", pa), ("b", pb), ("c", pc)])
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            s.reduce(torch.randn(32, generator=gen), [pa, pb])
        if with_c:
            s.reduce(torch.randn(16, generator=gen), [pc])
        return s

    state, twin = trained(False), trained(True)
    sd = twin.state_dict()
    state.load_state_dict(sd)  # a and b placed at once; c pending (no bucket of this state holds it yet)
    twin.load_state_dict(sd)
    assert set(state._pending) == {"c"}, state._pending
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused bind must not drop any state ("... is dropped")
        try:
            state.bind([("a", pa)])  # the checkpoint has c (and the state has b): refused
            refused = None
        except ValueError as e:
            refused = str(e)
    assert set(state._pending) == {"c"}, state._pending  # the loaded state of c is still there
    gen = torch.Generator().manual_seed(1)
    g, gc = torch.randn(32, generator=gen), torch.randn(16, generator=gen)
    same = torch.equal(state.reduce(g.clone(), [pa, pb]), twin.reduce(g.clone(), [pa, pb]))
    return refused, same and torch.equal(state.reduce(gc.clone(), [pc]), twin.reduce(gc.clone(), [pc]))


def _refused_ddp_bind(rank, world):
    def state_on(ddp):
        state = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0, auto_dense=False)
        return lorecomm.register(ddp, state=state)

    def trained(ddp, state):
        for step in range(3):
            tokens, img, y = batch(step, rank)
            ddp.zero_grad()
            torch.nn.functional.cross_entropy(ddp(tokens, img), y).backward()
        return state.stats()["bytes_sent"]

    torch.manual_seed(0)
    mine, twin = DDP(Net()), DDP(Net())
    state, twin_state = state_on(mine), state_on(twin)
    try:  # another model, which also needs the used flags: refused, and it must change nothing
        state.bind(DDP(Net(), find_unused_parameters=True))
        refused = None
    except RuntimeError as e:
        refused = str(e)
    return refused, trained(mine, state), trained(twin, twin_state)


def test_a_refused_bind_to_another_ddp_model_changes_nothing():
    refused, sent, untouched = run_ranks(_refused_ddp_bind, 1)[0]
    assert refused is not None and "already bound to another model" in refused, refused
    assert sent == untouched > 0, (sent, untouched)  # the used flags would add a flag per matrix and step


def test_refused_bind_leaves_the_state_as_it_was():
    refused, same = run_ranks(_refused_bind, 1)[0]
    assert refused is not None and "does not have (e.g. c;" in refused, refused
    assert same, "after a refused bind the state must go on exactly as an untouched one"


def test_compression_budget_counts_only_what_ddp_sends():
    def model(frozen):
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32), torch.nn.Linear(32, 64))
        if frozen:
            m[0].requires_grad_(False)
        return m if frozen else m[1:]  # the same trainable layers (named 1.*, 2.*), with or without a frozen one

    with_frozen = lorecomm.LoreState(compression=8).bind(model(True))._budget_ranks
    without = lorecomm.LoreState(compression=8).bind(model(False))._budget_ranks
    assert "0.weight" not in with_frozen
    assert with_frozen == without, (with_frozen, without)
    # bound to (name, param) pairs: the same budget; ranks() lists it before any bucket was planned
    pairs = lorecomm.LoreState(compression=8).bind(list(model(True).named_parameters()))
    assert pairs._budget_ranks == without
    assert pairs.ranks() == {n: r for n, r in without.items() if r is not None} and pairs.ranks()


def test_compression_ranks_are_recapped_at_the_planned_shape():
    """A budget rank is planned on the whole matrix; a bucket that holds a shard of it (as FSDP2 or a
    tensor-parallel stack hands over, with ``shapes=``) caps it at the shard and sends it dense where
    compressing the shard would not pay."""
    state = lorecomm.LoreState(compression=4).bind(torch.nn.Sequential(torch.nn.Linear(4096, 256)))
    r = state._budget_ranks["0.weight"]
    assert r > 32 and state._rank_for(256, 4096, "0.weight") == r
    assert state._rank_for(32, 4096, "0.weight") is None  # rank 32 of a 32 x 4096 shard would not pay
    # a 150 x 4096 shard: rank min(r, 150) = r pays there (bf16: 2 (150 + 4096) r * 2 < 4 * 150 * 4096)
    assert state._rank_for(150, 4096, "0.weight") == r
    assert state._rank_for(100, 4096, "0.weight") is None  # r > 100 is capped at 100, which does not pay


def _checkpoint_of_another_rank(rank, world):
    w = torch.nn.Parameter(torch.zeros(4, 4))
    state = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind([("w", w)])
    for _ in range(2):
        state.reduce(torch.randn(16), [w])
    mine = state.state_dict()
    files = [None] * world
    dist.all_gather_object(files, mine)
    state.load_state_dict(files[rank])  # its own: fine
    try:
        state.load_state_dict(files[0])  # every rank loads rank 0's (a rank-0-only checkpoint)
    except ValueError as e:
        return str(e)


def test_a_checkpoint_of_another_rank_is_refused_on_every_rank():
    for msg in run_ranks(_checkpoint_of_another_rank, 2):
        assert msg is not None and '"its own (error buffers are per rank' in msg and "\"rank 0's" in msg, msg


def _one_rank_cannot_load(rank, world, case):
    w = torch.nn.Parameter(torch.zeros(4, 4))
    state = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind([("w", w)])
    for _ in range(2):
        state.reduce(torch.randn(16), [w])
    sd = state.state_dict()
    if rank == 1:  # only rank 1's file is of another run, or no lorecomm file at all
        sd = {"config": {**sd, "config": {**sd["config"], "seed": 7}}, "empty": {}, "list": [1, 2]}[case]
    try:
        state.load_state_dict(sd)
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("case, needle", [("config", "state_dict config differs"),
                                          ("empty", "state_dict lacks kind, world_size"),
                                          ("list", "state_dict must be the dict")])
def test_a_checkpoint_one_rank_cannot_load_is_refused_on_every_rank(case, needle):
    """Not only on the rank whose file is bad (the others would wait for it in the next collective)."""
    m0, m1 = run_ranks(_one_rank_cannot_load, 2, case)
    assert m0 is not None and m1 is not None, (m0, m1)
    for msg in (m0, m1):
        assert "the ranks disagree on the checkpoint" in msg and needle in msg, msg


def _value_error(fn, *args):
    """The message of the ValueError ``fn(*args)`` raises (None if it does not)."""
    try:
        fn(*args)
    except ValueError as e:
        return str(e)


def _state_follows_names(rank, world):
    import warnings

    def model(head_out, first=None):
        layers = {"body": torch.nn.Linear(8, 8), "head": torch.nn.Linear(8, head_out)}
        return torch.nn.ModuleDict({**({"first": first} if first is not None else {}), **layers})

    def train(state, m, steps=2):
        for _ in range(steps):
            ps = [m["body"].weight, m["head"].weight]
            state.reduce(torch.cat([torch.randn(p.numel()) for p in ps]), ps)

    out = {}
    small = model(4)
    saved = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(small)
    train(saved, small)
    sd = saved.state_dict()
    # a checkpoint whose head had 4 outputs, into a model whose head has 8: named, at load (used
    # state) or at the first step (fresh state: the state is placed there)
    m8 = model(8)
    used = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(m8)
    train(used, m8)
    out["used"] = _value_error(used.load_state_dict, sd)
    fresh = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(m8)
    fresh.load_state_dict(sd)
    for attempt in ("fresh", "again"):  # refused, and still refused: the checkpoint stays pending
        out[attempt] = _value_error(train, fresh, m8, 1)
    # bound anew after layers were added in front of the head (its position shifts, body.weight is gone):
    # the head's state follows its name; body.weight's is dropped, said
    before = saved._param_tensors()["head.weight"]["E"].clone()
    small["body"] = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved.bind(small)
    out["dropped"] = [str(w.message) for w in caught if "no parameter" in str(w.message)]
    out["follows"] = torch.equal(saved._param_tensors()["head.weight"]["E"], before)
    # the head replaced by one of another shape: it starts afresh, said
    small["head"] = torch.nn.Linear(8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved.bind(small)
        ps = [small["body"][0].weight, small["body"][1].weight, small["head"].weight]
        saved.reduce(torch.cat([torch.randn(p.numel()) for p in ps]), ps)
    out["reshaped"] = [str(w.message) for w in caught if "no longer fits" in str(w.message)]
    return out


def test_state_follows_parameter_names_and_a_shape_that_changed_is_named():
    for out in run_ranks(_state_follows_names, 2):
        for key in ("used", "fresh", "again"):
            assert "the checkpoint's state of head.weight does not fit its shape now" in (out.get(key) or ""), out
        assert out["follows"] is True
        assert len(out["dropped"]) == 1 and "no parameter body.weight" in out["dropped"][0], out
        assert len(out["reshaped"]) == 1 and "the state of head.weight no longer fits" in out["reshaped"][0], out
        assert "E (4, 8) vs (8, 8)" in out["reshaped"][0] and "): E starts afresh" in out["reshaped"][0], out  # Q (2, 8) fits


def _memory_format_changed(rank, world):
    import warnings

    def conv(fmt):
        torch.manual_seed(0)
        return torch.nn.Conv2d(4, 8, 3, bias=False).to(memory_format=fmt)

    def train(state, m, steps=1):
        for _ in range(steps):
            state.reduce(torch.randn(m.weight.numel()), [m.weight])

    out = {}
    m = conv(torch.contiguous_format)
    saved = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(m)
    train(saved, m, 2)
    sd = saved.state_dict()
    assert sd["layouts"] == {"weight": [0, 1, 2, 3]}, (sd["layouts"], list(sd["params"]))
    last = conv(torch.channels_last)
    fresh = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(last)
    fresh.load_state_dict(sd)
    out["fresh"] = _value_error(train, fresh, last)
    used = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(last)
    train(used, last)
    out["used"] = _value_error(used.load_state_dict, sd)
    same = conv(torch.contiguous_format)  # the format it was saved in: loads and trains
    ok = lorecomm.LoreState(rank=2, start_step=1, min_compression_rate=1.0).bind(same)
    ok.load_state_dict(sd)
    train(ok, same)
    # converted in the same run: the state starts afresh, said
    m.to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved.bind(m)
        train(saved, m)
    out["converted"] = [str(w.message) for w in caught if "memory order" in str(w.message)]
    return out


def test_a_state_made_in_another_memory_format_is_refused_or_restarted():
    for out in run_ranks(_memory_format_changed, 2):
        for key in ("fresh", "used"):
            msg = out.get(key) or ""
            assert "weight's gradient lies in the bucket in memory order (0, 2, 3, 1)" in msg, out
            assert "(0, 1, 2, 3)" in msg and "model.to(memory_format=...)" in msg, out
        assert len(out["converted"]) == 1 and "starts afresh" in out["converted"][0], out


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.aux, self.head = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 4)

    def forward(self, x, use_aux):
        h = torch.relu(self.fc1(x))
        return self.head(h + self.aux(h) if use_aux else h)


_UNUSED_BRANCH_CONFIGS = {
    "lore": dict(auto_dense=False),
    # refreshes at steps 4, 7 and 10: one while aux is unused
    "greedylore": dict(compressor="greedylore", update_interval=3),
    "randk-ef": dict(compressor="random_linear", kind="randk", error_feedback=True),
}


def _unused_branch(rank, world, compressor="lore"):
    torch.manual_seed(0)
    m = Branchy()
    ddp = DDP(m, find_unused_parameters=True)
    state = lorecomm.register(ddp, rank=2, start_step=3, **_UNUSED_BRANCH_CONFIGS[compressor])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    owed = []
    for step in range(1, 11):
        use = step <= 5 or step == 10  # unused on every rank for steps 6-9
        g = torch.Generator().manual_seed(step * 10 + rank)
        opt.zero_grad()
        ddp(torch.randn(8, 32, generator=g), use).square().mean().backward()
        opt.step()
        owed.append(state._param_tensors()["aux.weight"]["E"].clone())
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    return state._skip_unused, owed, flat


@pytest.mark.parametrize("compressor", sorted(_UNUSED_BRANCH_CONFIGS))
def test_a_branch_no_rank_used_keeps_its_error_feedback(compressor):
    """DDP(find_unused_parameters=True) drops the output of a parameter no rank used: every compressor
    with error feedback keeps what it owes (E) for when it is used again, instead of sending it into the
    dropped output."""
    (skips, owed, p0), (_, _, p1) = run_ranks(_unused_branch, 2, compressor)
    assert skips is True and torch.equal(p0, p1)
    assert owed[4].norm() > 0
    for t in (5, 6, 7, 8):  # steps 6-9: unchanged
        assert torch.equal(owed[t], owed[4]), t
    assert not torch.equal(owed[9], owed[4])  # used again at step 10: sent (E holds the new residual)


def _unused_at_the_flush(rank, world):
    torch.manual_seed(0)
    m = Branchy()
    ddp = DDP(m, find_unused_parameters=True)
    state = lorecomm.register(ddp, rank=2, start_step=3, wire=torch.float32)  # fp32: sums exact to fp32
    flush = state._auto_start + state.AUTO_DENSE_STEPS + 1  # auto_dense's first dense step
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    w = m.aux.weight
    local, applied, kept, phases = torch.zeros_like(w), torch.zeros_like(w), [], []
    for step in range(1, flush + 3):
        use = step not in (flush, flush + 1)  # no rank uses aux at the flush and the step after it
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step * 10 + rank))
        if use:  # this rank's own gradient (autograd.grad: DDP's reducer does not see it)
            local += torch.autograd.grad(m(x, True).square().mean(), w)[0]
        E0 = state._param_tensors()["aux.weight"]["E"].clone() if step > 1 else None
        phases.append(state.phase(step))
        opt.zero_grad()
        ddp(x, use).square().mean().backward()
        if w.grad is not None:  # what DDP applied (dropped where no rank used aux)
            applied += w.grad
        opt.step()
        E = state._param_tensors()["aux.weight"]["E"]
        kept.append(E0 is not None and E.norm() > 0 and torch.equal(E, E0))
    return {"local": local, "applied": applied, "E": E.clone(), "kept": kept, "phases": phases,
            "flush": flush}


def test_an_error_flush_keeps_what_a_parameter_no_rank_used_owes():
    """auto_dense's first dense step flushes the error buffers; a parameter no rank used then (DDP
    drops its output) keeps its E until it is used again, so over the run DDP applies exactly the
    ranks' mean gradient: nothing owed is lost."""
    res = run_ranks(_unused_at_the_flush, 2)
    mean = (res[0]["local"] + res[1]["local"]) / 2
    for out in res:
        f = out["flush"]
        assert out["phases"][f - 2] == "compressed" and out["phases"][f - 1] == "dense", out["phases"]
        assert out["kept"][f - 1] and out["kept"][f], out["kept"]  # unused at the flush and after: kept
        assert torch.count_nonzero(out["E"]) == 0  # used again during the probe: flushed then
        torch.testing.assert_close(out["applied"], mean, rtol=1e-4, atol=1e-6)


def _rebind_new_wrapper(rank, world):
    model = torch.nn.Linear(8, 8)
    state = lorecomm.register(DDP(model), rank=2, start_step=1, min_compression_rate=1.0, auto_dense=False)
    again = DDP(model)  # a stack that wraps the same module anew (Lightning's next fit)
    state.bind(again)
    try:
        state.bind(DDP(torch.nn.Linear(8, 8)))
    except RuntimeError as e:
        return str(e)


def test_rebinding_to_a_new_wrapper_of_the_same_module_is_allowed():
    for msg in run_ranks(_rebind_new_wrapper, 2):
        assert msg is not None and "already bound to another model" in msg, msg


def _rollback_to_a_new_state(rank, world, kind):
    shapes = [("w1", (16, 24)), ("w2", (20, 30))]

    def fresh():
        ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in shapes]
        cls = lorecomm.LoreState if kind == "lore" else lorecomm.GreedyLoreState
        extra = dict(auto_dense=False) if kind == "lore" else dict(update_interval=3)
        return cls(rank=2, start_step=1, min_compression_rate=1.0, **extra).bind(
            [(n, p) for (n, _), p in zip(shapes, ps)]), ps

    def run(state, ps, seed, steps):
        g = torch.Generator().manual_seed(100 * seed + rank)
        out = []
        for _ in range(steps):
            bufs = [torch.randn(16 * 24, generator=g), torch.randn(20 * 30, generator=g)]
            for i, (buf, p) in enumerate(zip(bufs, ps)):
                state.reduce(buf, [p], None, i == 1)
            out.append(torch.cat(bufs))
        return out

    used, ps = fresh()
    at_zero = used.state_dict()  # before any bucket: no per-parameter state in the file
    run(used, ps, 1, 4)
    used.load_state_dict(at_zero)  # roll back to the start
    new, new_ps = fresh()
    return [torch.equal(a, b) for a, b in zip(run(used, ps, 2, 5), run(new, new_ps, 2, 5))]


@pytest.mark.parametrize("kind", ["lore", "greedylore"])
def test_rolling_back_to_a_checkpoint_from_before_the_first_step_equals_a_new_state(kind):
    for same in run_ranks(_rollback_to_a_new_state, 2, kind):
        assert all(same), same
