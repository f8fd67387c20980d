"""Lore, GreedyLore and the baselines on real Gloo ranks, held against the float64 simulation."""
from __future__ import annotations

import pytest
import torch

import lorecomm
from lorecomm.simulate import SimulatedGreedyLore, SimulatedLore, SimulatedRandomLinear

from distributed import run_ranks

# shapes: m < n, m > n, a 1-D bias, a conv kernel, a name-filtered matrix, a
# second same-shape matrix (batched with the first), a matrix too small to pay
PARAMS = [("w1", (24, 40)), ("b1", (24,)), ("w2", (40, 24)), ("w3", (24, 40)), ("conv", (12, 4, 3, 3)),
          ("embed", (30, 30)), ("tiny", (3, 4))]


def structured_grads(step: int, rank: int, params=PARAMS) -> list[torch.Tensor]:
    """Low-rank signal shared by the ranks (distinct singular values) plus per-rank noise."""
    noise = torch.Generator().manual_seed(1000 * step + rank)
    shared = torch.Generator().manual_seed(step)
    out = []
    for _, shape in params:
        x = 0.1 * torch.randn(shape, generator=noise, dtype=torch.float64)
        if len(shape) >= 2:
            m, n = shape[0], int(torch.tensor(shape[1:]).prod())
            left = torch.randn(m, 3, generator=shared, dtype=torch.float64) * torch.tensor([3.0, 1.7, 0.9],
                                                                                             dtype=torch.float64)
            x = x + (left @ torch.randn(3, n, generator=shared, dtype=torch.float64)).reshape(shape)
        out.append(x)
    return out


_STATES = {"greedy": lorecomm.GreedyLoreState, "random": lorecomm.RandomLinearState, "lore": lorecomm.LoreState}
_SIMS = {"greedy": SimulatedGreedyLore, "random": SimulatedRandomLinear, "lore": SimulatedLore}


def _make_state(kind: str, cfg: dict):
    return _STATES[kind](**cfg)


def _run_configs(rank, world, configs, steps, params, device="cpu"):
    """Each config on fresh state: reduce the structured gradients (buckets on ``device``), keep every output."""
    results = []
    for kind, cfg in configs:
        ps = [torch.nn.Parameter(torch.zeros(s, device=device)) for _, s in params]
        state = _make_state(kind, cfg).bind([(n, p) for (n, _), p in zip(params, ps)])
        outs = []
        for t in range(1, steps + 1):
            buf = torch.cat([g.float().reshape(-1) for g in structured_grads(t, rank, params)]).to(device)
            state.reduce_async(buf, ps).wait()  # the hook's own entry point, on the engine
            outs.append(buf.cpu())
        results.append((outs, state.stats()))
    return results


def _simulate(kind, cfg, world, steps, params):
    sim = _SIMS[kind](world, params, **cfg)
    return [torch.cat([o.reshape(-1) for o in sim.step([structured_grads(t, i, params) for i in range(world)])])
            for t in range(1, steps + 1)]


BASE = dict(rank=2, update_interval=3, start_step=2, min_compression_rate=1.5)
CONFIGS = [
    ("greedy", BASE),  # default probes (sketch)
    ("greedy", {**BASE, "probes": "paper"}),
    ("greedy", {**BASE, "rank": 1}),
    ("greedy", {**BASE, "probes": "sketch", "sketch_size": 3}),
    ("greedy", {**BASE, "selection": "fixed"}),
    ("greedy", {**BASE, "selection": "random"}),
    ("greedy", {**BASE, "error_feedback": False}),
    ("random", dict(kind="haar", rank=2, start_step=1, min_compression_rate=1.5)),
    ("random", dict(kind="gaussian", rank=2, start_step=1, min_compression_rate=1.5, error_feedback=True)),
    ("random", dict(kind="randk", rank=2, start_step=1, min_compression_rate=1.5)),
    ("random", dict(kind="randk", rank=2, start_step=1, min_compression_rate=1.5, error_feedback=True)),
    # Lore: the exact wire, with and without the random directions; rank 1 (an exploring step sends
    # two directions); the bf16 wire (equal up to where a bf16 rounding flips, see TOLERANCE)
    ("lore", dict(rank=2, start_step=2, min_compression_rate=1.5, wire=torch.float32, explore=0.0)),
    ("lore", dict(rank=3, start_step=2, min_compression_rate=1.2, wire=torch.float32, explore=1.0)),
    ("lore", dict(rank=1, start_step=2, min_compression_rate=1.5, wire=torch.float32, explore=1.0)),
    ("lore", dict(rank=2, start_step=2, min_compression_rate=1.5, explore=0.5)),
]
# relative error vs the float64 simulation; a bf16 wire rounds float32 (runtime) and float64
# (simulation) values, which land on different bf16 neighbours where they straddle a rounding
# boundary, and with 4 ranks Gloo's ring adds in bf16 hop by hop (the simulation rounds the sum once)
TOLERANCE = {(torch.bfloat16, 2): 3e-2, (torch.bfloat16, 4): 8e-2}
STEPS = 9  # warm-up 2, refreshes at 3, 6, 9, compressed steps between


def check_against_simulation(results, world, where=""):
    """Every rank's outputs of every CONFIGS entry: bit-identical replicas, within TOLERANCE of float64."""
    for c, (kind, cfg) in enumerate(CONFIGS):
        ref = _simulate(kind, cfg, world, STEPS, PARAMS)
        phases = results[0][c][1]["steps_by_phase"]
        assert phases.get("compressed", 0) >= 4, phases
        for t in range(STEPS):
            got = [results[r][c][0][t] for r in range(world)]
            for r in range(1, world):
                assert torch.equal(got[0], got[r]), f"{kind} {cfg}: ranks 0 and {r} differ at step {t + 1}"
            scale = ref[t].abs().max()
            err = (got[0].double() - ref[t]).abs().max() / scale
            # a world of one rounds nothing in the reduction: the 2-rank tolerance bounds it
            tol = TOLERANCE.get((cfg.get("wire", torch.bfloat16) if kind == "lore" else None, max(world, 2)), 1e-4)
            assert err < tol, f"{where}{kind} {cfg} step {t + 1}: relative error {err:.2e} vs simulation"


@pytest.mark.parametrize("world", [2, 4])
def test_runtime_matches_float64_simulation(world):
    check_against_simulation(run_ranks(_run_configs, world, CONFIGS, STEPS, PARAMS), world)


def test_lore_at_rank_1_with_a_row_vector_matches_the_simulation():
    """Rank 1, every step exploring, on the bf16 wire (where a 1 x 64 matrix pays): the 24 x 40 matrix
    sends its tracked and its random direction, the 1 x 64 one has no room for a random direction."""
    params = [("w", (24, 40)), ("row", (1, 64)), ("b", (24,))]
    cfg = dict(rank=1, start_step=2, min_compression_rate=1.5, explore=1.0)
    sim = SimulatedLore(2, params, **cfg)
    assert sim.ranks[0] == sim.ranks[1] == 1, sim.ranks  # both compressed
    ref = [torch.cat([o.reshape(-1) for o in sim.step([structured_grads(t, i, params) for i in range(2)])])
           for t in range(1, STEPS + 1)]
    res = run_ranks(_run_configs, 2, [("lore", cfg)], STEPS, params)
    for t in range(STEPS):
        got = [res[r][0][0][t] for r in range(2)]
        assert torch.equal(got[0], got[1]), f"replicas differ at step {t + 1}"
        err = (got[0].double() - ref[t]).abs().max() / ref[t].abs().max()
        assert err < TOLERANCE[(torch.bfloat16, 2)], f"step {t + 1}: relative error {err:.2e} vs simulation"
    assert res[0][0][1]["bytes_sent"] == sim.bytes_sent  # every step explores: 2 directions, 1 for the row


def _full_rank(rank, world):
    params = [("w", (12, 20)), ("v", (20, 6))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in params]
    state = lorecomm.GreedyLoreState(rank=20, update_interval=100, start_step=1,
                                     min_compression_rate=0.5).bind([(n, p) for (n, _), p in zip(params, ps)])
    outs = []
    for t in range(1, 6):
        gs = structured_grads(t, rank, params)
        buf = torch.cat([g.float().reshape(-1) for g in gs])
        state.reduce(buf, ps)
        outs.append(buf)
    return outs, state.stats()


def test_full_rank_compressed_path_is_dense_averaging():
    res = run_ranks(_full_rank, 2)
    stats = res[0][1]
    assert stats["steps_by_phase"]["compressed"] == 3 and stats["compressed_matrices"] == 2
    params = [("w", (12, 20)), ("v", (20, 6))]
    for t in range(5):
        mean = sum(torch.cat([g.reshape(-1) for g in structured_grads(t + 1, r, params)]) for r in range(2)) / 2
        torch.testing.assert_close(res[0][0][t].double(), mean, rtol=1e-5, atol=1e-5)


# --- convergence on a problem with low-rank gradient structure -----------------
A, B, R = 48, 64, 2


def _target():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(A, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(B, 6, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor([1, .8, .6, .5, .4, .3], dtype=torch.float64)) @ v.t()


def _train_variants(rank, world, variants, steps, lr):
    """SGD on 0.5||W - W*||^2 with per-rank gradient noise; loss after every step."""
    target = _target()
    curves = {}
    for name, cfg in variants.items():
        w = torch.nn.Parameter(torch.zeros(A, B))
        state = lorecomm.GreedyLoreState(rank=R, min_compression_rate=1.0, update_interval=10_000, **cfg)
        state.bind([("w", w)])
        noise = torch.Generator().manual_seed(rank + 1)
        W = torch.zeros(A, B, dtype=torch.float64)
        losses = []
        for _ in range(steps):
            g = (W - target + 0.01 * torch.randn(A, B, generator=noise, dtype=torch.float64)).float().reshape(-1)
            state.reduce(g, [w])
            W = W - lr * g.double().view(A, B)
            losses.append(0.5 * float(((W - target) ** 2).sum()))
        curves[name] = losses
    return curves


def test_greedy_beats_random_error_feedback_matters_fixed_stalls():
    variants = {
        "dense": dict(start_step=10**6),
        "greedy": dict(start_step=1),
        "random": dict(start_step=1, selection="random"),
        "fixed": dict(start_step=1, selection="fixed"),
        "no_ef": dict(start_step=1, error_feedback=False),
    }
    curves = run_ranks(_train_variants, 2, variants, 60, 0.05)[0]
    L0 = 0.5 * float((_target() ** 2).sum())
    at = {k: v[49] / L0 for k, v in curves.items()}
    assert at["greedy"] < 0.02 and at["greedy"] < 2.5 * at["dense"], at
    # (the random ablation's draws come from the shared Philox probes, derived on device)
    assert at["greedy"] < 0.125 * at["random"], at
    assert at["greedy"] < 0.25 * at["no_ef"], at
    # Proposition 1: a fixed rank-r projector stalls -- no progress between steps 30 and 50
    fixed = curves["fixed"]
    assert fixed[49] / L0 > 0.2 and fixed[49] > 0.9 * fixed[29], at
    assert curves["greedy"][49] < 0.5 * curves["greedy"][29]


# --- byte accounting ------------------------------------------------------------
def _bytes(rank, world):
    params = [("w", (8, 32)), ("bias", (8,)), ("u", (32, 8)), ("embed", (16, 16))]
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in params]
    cfgs = {
        "paper": dict(rank=2, update_interval=4, start_step=1, probes="paper"),
        "sketch": dict(rank=2, update_interval=4, start_step=1, probes="sketch", sketch_size=3),
        "fixed": dict(rank=2, update_interval=4, start_step=1, selection="fixed"),
    }
    out = {}
    for name, cfg in cfgs.items():
        state = lorecomm.GreedyLoreState(**cfg).bind([(n, p) for (n, _), p in zip(params, ps)])
        per_step = []
        for dtype in (torch.float32,) * 3 + (torch.bfloat16,) * 3:
            before = state.stats()["bytes_sent"]
            state.reduce(torch.randn(8 * 32 + 8 + 32 * 8 + 256).to(dtype), ps)
            per_step.append(state.stats()["bytes_sent"] - before)
        out[name] = (per_step, state.stats())
    rl = lorecomm.RandomLinearState(kind="haar", rank=2).bind([(n, p) for (n, _), p in zip(params, ps)])
    rl.reduce(torch.randn(8 * 32 + 8 + 32 * 8 + 256), ps)
    out["haar"] = ([rl.stats()["bytes_sent"]], rl.stats())
    return out


def test_byte_accounting_matches_hand_computed_payloads():
    out = run_ranks(_bytes, 2)[0]
    numel = 8 * 32 + 8 + 32 * 8 + 256
    dense_leftover = 8 + 256  # bias + embed
    # two 8x32 matrices (one transposed), a = 8, b = 32, r = 2
    factors = 2 * 2 * 32
    # steps: 1 warm-up, 2 refresh, 3-5 compressed, 6 refresh; fp32 buffers for 1-3, bf16 for 4-6.
    # Refreshes all-reduce in fp32 whatever the bucket dtype; compressed steps send fp32 factors.
    warm, refresh = 4 * numel, 4 * numel
    checksum = 2 * 2 * 8  # (checksum, -checksum) per matrix, int64, on refresh steps
    compressed = 4 * (2 * 8) + 4 * (factors + dense_leftover)  # a scores per matrix + payload
    assert out["paper"][0] == [warm, refresh + checksum, compressed, compressed, compressed, refresh + checksum]
    assert out["sketch"][0][2] == 4 * (2 * 8 * 3) + 4 * (factors + dense_leftover)
    assert out["fixed"][0][2] == 4 * 1 + 4 * (factors + dense_leftover)  # finite flag + payload
    stats = out["paper"][1]
    assert stats["bytes_dense"] == 3 * 4 * numel + 3 * 2 * numel
    assert stats["compression_ratio"] == pytest.approx(stats["bytes_dense"] / stats["bytes_sent"])
    assert out["haar"][0] == [4 * 1 + 4 * (factors + dense_leftover)]


# --- parameters DDP found unused (find_unused_parameters=True) ------------------------------------
UNUSED_PARAMS = [("w1", (24, 40)), ("w3", (24, 40)), ("w2", (40, 24)), ("b1", (24,))]
UNUSED_STEPS = {"w3": (4, 5, 6)}  # zero on every rank: DDP drops its output
ZERO_ON_RANK0 = {"w2": (5,)}     # zero on one rank only: used, averaged as usual


def unused_grads(step: int, rank: int) -> list[torch.Tensor]:
    gs = structured_grads(step, rank, UNUSED_PARAMS)
    for p, (name, _) in enumerate(UNUSED_PARAMS):
        if step in UNUSED_STEPS.get(name, ()) or (rank == 0 and step in ZERO_ON_RANK0.get(name, ())):
            gs[p] = torch.zeros_like(gs[p])
    return gs


def _unused_run(rank, world, cfg, dtype=torch.float32, kind="lore"):
    ps = [torch.nn.Parameter(torch.zeros(s)) for _, s in UNUSED_PARAMS]
    state = _make_state(kind, cfg).bind([(n, p) for (n, _), p in zip(UNUSED_PARAMS, ps)])
    state._skip_unused = True  # what binding to DDP(find_unused_parameters=True) sets
    outs, kept = [], []
    for t in range(1, 9):
        buf = torch.cat([g.to(dtype).reshape(-1) for g in unused_grads(t, rank)])
        before = {k: v.clone() for k, v in state._param_tensors().get("w3", {}).items()}
        state.reduce(buf, ps)
        outs.append(buf)
        after = state._param_tensors()["w3"]
        kept.append(bool(before) and all(torch.equal(before[k], after[k]) for k in before))
    return outs, kept, state.stats()["bytes_sent"], state._param_tensors()["w3"]["E"].double()


W3 = slice(24 * 40, 2 * 24 * 40)  # w3 in the flat bucket (24 x 40: E holds it as it is)


@pytest.mark.parametrize("explore", [0.0, 1.0])
def test_lore_keeps_what_an_unused_parameter_owes(explore):
    """A matrix whose gradient is 0 on every rank (DDP drops its output) sends nothing and keeps E and Q,
    held against the float64 simulation; one that is 0 on one rank only is averaged as usual."""
    cfg = dict(rank=2, start_step=2, min_compression_rate=1.5, wire=torch.float32, explore=explore)
    res = run_ranks(_unused_run, 2, cfg)
    sim = SimulatedLore(2, UNUSED_PARAMS, skip_unused=True, **cfg)
    _held_to_the_simulation(res, sim, first_checked=1)


def _held_to_the_simulation(res, sim, first_checked):
    """``first_checked``: the first step whose 'state kept' flag is asserted (a baseline's state exists,
    untouched, through the dense warm-up: kept there says nothing)."""
    for t in range(1, 9):
        ref = torch.cat([o.reshape(-1) for o in sim.step([unused_grads(t, i) for i in range(2)])])
        assert torch.equal(res[0][0][t - 1], res[1][0][t - 1]), f"replicas differ at step {t}"
        err = (res[0][0][t - 1].double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"step {t}: relative error {err:.2e} vs simulation"
        if t in UNUSED_STEPS["w3"]:
            assert torch.count_nonzero(res[0][0][t - 1][W3]) == 0
    for _, kept, nbytes, _ in res:  # the state changes where w3 is used
        assert kept[first_checked - 1:] == [t in UNUSED_STEPS["w3"] for t in range(first_checked, 9)], kept
        assert nbytes == sim.bytes_sent
    # nothing lost: what the optimizer got of w3 (DDP drops its outputs while no rank uses it) plus
    # what the ranks still owe (their mean E) is every gradient of w3 given
    p = [n for n, _ in UNUSED_PARAMS].index("w3")
    given = sum((unused_grads(t, 0)[p] + unused_grads(t, 1)[p]) / 2 for t in range(1, 9))
    applied = sum(res[0][0][t - 1][W3].double() for t in range(1, 9) if t not in UNUSED_STEPS["w3"])
    owed = (res[0][3] + res[1][3]) / 2
    err = (applied.view(24, 40) + owed - given).abs().max() / given.abs().max()
    assert err < 1e-5, f"w3: {err:.2e} of its gradient lost"


@pytest.mark.parametrize("kind, cfg", [
    # start_step 1: refreshes at steps 2, 5 and 8, so w3 owes a nonzero E (from step 3) when it goes
    # unused at step 4, and is unused at the refresh of step 5
    ("greedy", dict(selection="greedy", update_interval=3, start_step=1)),
    ("greedy", dict(selection="fixed", update_interval=3, probes="paper", start_step=1)),
    ("random", dict(kind="randk", error_feedback=True)),
    ("random", dict(kind="haar", error_feedback=True)),
], ids=["greedylore", "greedylore-fixed", "randk-ef", "haar-ef"])
def test_the_baselines_keep_what_an_unused_parameter_owes(kind, cfg):
    """GreedyLore (compressed and refresh steps) and the random-linear baselines with error feedback: a
    matrix no rank used sends 0 and keeps its state (E, and GreedyLore's basis), held against the float64
    simulation; nothing of its gradient is lost."""
    cfg = {"rank": 2, "start_step": 2, "min_compression_rate": 1.5, **cfg}
    res = run_ranks(_unused_run, 2, cfg, torch.float32, kind)
    _held_to_the_simulation(res, _SIMS[kind](2, UNUSED_PARAMS, skip_unused=True, dense_name_patterns=(), **cfg),
                            first_checked=3)


@pytest.mark.parametrize("kind, cfg", [("greedy", dict(update_interval=3, start_step=1)),
                                       ("random", dict(kind="randk", error_feedback=True))],
                         ids=["greedylore", "randk-ef"])
def test_the_baselines_keep_what_an_unused_parameter_owes_in_fp16_buckets(kind, cfg):
    cfg = {"rank": 2, "start_step": 2, "min_compression_rate": 1.5, **cfg}
    for outs, kept, _, _ in run_ranks(_unused_run, 2, cfg, torch.float16, kind):
        assert kept[2:] == [t in UNUSED_STEPS["w3"] for t in range(3, 9)], kept
        assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("rank, explore", [(2, 0.0), (1, 1.0)])
def test_lore_keeps_what_an_unused_parameter_owes_in_fp16_buckets(rank, explore):
    """fp16 buckets update E only after the output was checked: the unused matrix's E stays there too
    (at rank 1 exploring, the check's second projection has the step's two directions)."""
    cfg = dict(rank=rank, start_step=2, min_compression_rate=1.5, explore=explore)
    for outs, kept, _, _ in run_ranks(_unused_run, 2, cfg, torch.float16):
        assert kept == [t in UNUSED_STEPS["w3"] for t in range(1, 9)], kept
        assert all(torch.isfinite(o).all() for o in outs)
