"""FSDP2 hybrid sharding with lorecomm's compressed cross-replica all-reduce: 4 Gloo ranks,
a (replicate 2, shard 2) mesh, FSDP over the shard group, lorecomm over the replicate group."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks

STEPS = 5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 16))


def _shard(model, mesh, mp=None):
    from torch.distributed.fsdp import fully_shard

    kw = {} if mp is None else {"mp_policy": mp}
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def _batch(g):
    return torch.randn(8, 32, generator=g), torch.randn(8, 16, generator=g)


def _train(model, opt, steps, rank, start=0, accumulate=1):
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(start * accumulate):  # the same data stream after a resume
        _batch(g)
    for _ in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            model.set_requires_gradient_sync(micro == accumulate - 1)
            x, y = _batch(g)
            ((model(x).float() - y) ** 2).mean().backward()
        opt.step()


def _full(model):
    return torch.cat([p.full_tensor().detach().float().reshape(-1) for p in model.parameters()])


def _local(model):
    return torch.cat([p.to_local().detach().float().reshape(-1) for p in model.parameters()])


def _replicas_agree(model, mesh):
    """Every replica group's ranks hold bit-identical shards."""
    mine = _local(model)
    group = mesh["replicate"].get_group()
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return all(torch.equal(out[0], o) for o in out)


def _worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lorecomm.integrations import fsdp as lore_fsdp
    from lorecomm.integrations._launch import count_calls

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    # FSDP2's own HSDP: reduce-scatter over the shard group, all-reduce over the replicate group
    m = _shard(_model(), mesh)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    _train(m, opt, STEPS, rank)
    out["hsdp"] = _full(m)
    # lorecomm at full rank on an fp32 wire: the same training
    for name, cfg in {"exact": dict(rank=64, wire=torch.float32, min_compression_rate=0.1),
                      "low": dict(rank=4), "greedy": dict(compressor="greedylore", rank=4, update_interval=3)}.items():
        m = _shard(_model(), mesh["shard"])
        state = lore_fsdp.register(m, mesh=mesh, start_step=1, auto_dense=False, **cfg) if name != "greedy" else \
            lore_fsdp.register(m, mesh=mesh, start_step=1, **cfg)
        calls = count_calls(state)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for i in range(STEPS):
            calls.append(0)
            _train(m, opt, 1, rank, start=i)
        st = state.stats()
        out[name] = dict(full=_full(m), stats=st, calls=list(calls), agree=_replicas_agree(m, mesh))
    # gradient accumulation (no reduce-scatter on the first micro-batch) with a bf16 reduce dtype
    m = _shard(_model(), mesh["shard"], MixedPrecisionPolicy(reduce_dtype=torch.bfloat16))
    state = lore_fsdp.register(m, mesh=mesh, rank=4, start_step=1, auto_dense=False)
    calls = count_calls(state)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for i in range(STEPS):
        calls.append(0)
        _train(m, opt, 1, rank, start=i, accumulate=2)
    out["accum_bf16"] = dict(stats=state.stats(), calls=list(calls), agree=_replicas_agree(m, mesh),
                             finite=bool(torch.isfinite(_local(m)).all()))
    # a per-rank checkpoint mid-run resumes bit-exactly
    straight = _shard(_model(), mesh["shard"])
    lore_fsdp.register(straight, mesh=mesh, rank=4, start_step=1, auto_dense=False)
    opt = torch.optim.SGD(straight.parameters(), lr=0.05, momentum=0.9)
    _train(straight, opt, 6, rank)
    first = _shard(_model(), mesh["shard"])
    s1 = lore_fsdp.register(first, mesh=mesh, rank=4, start_step=1, auto_dense=False)
    o1 = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    _train(first, o1, 3, rank)
    ckpt = (s1.state_dict(), o1.state_dict(), [p.to_local().clone() for p in first.parameters()])
    second = _shard(_model(), mesh["shard"])
    s2 = lore_fsdp.register(second, mesh=mesh, rank=4, start_step=1, auto_dense=False)
    o2 = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        for p, saved in zip(second.parameters(), ckpt[2]):
            p.to_local().copy_(saved)
    o2.load_state_dict(ckpt[1])
    s2.load_state_dict(ckpt[0])
    _train(second, o2, 3, rank, start=3)
    out["resume"] = (torch.equal(_local(straight), _local(second)), s2.stats()["steps"])
    # frozen parameters (a fine-tune): one module all frozen, one with a frozen weight and a trainable bias
    m = _model()
    m[0].requires_grad_(False)
    m[2].weight.requires_grad_(False)
    m = _shard(m, mesh["shard"])
    state = lore_fsdp.register(m, mesh=mesh, rank=4, start_step=1, auto_dense=False)
    calls = count_calls(state)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    for i in range(STEPS):
        calls.append(0)
        _train(m, opt, 1, rank, start=i)
    out["frozen"] = dict(stats=state.stats(), calls=list(calls), agree=_replicas_agree(m, mesh))
    # refusals
    hsdp = _shard(_model(), mesh)
    try:
        lore_fsdp.register(hsdp, mesh=mesh, rank=4)
        out["refused_hsdp"] = None
    except NotImplementedError as e:
        out["refused_hsdp"] = str(e)
    try:  # a byte budget planned on whole matrices would not hold for the shards each replica sends
        lore_fsdp.register(_shard(_model(), mesh["shard"]), mesh=mesh, compression=4)
        out["refused_budget"] = None
    except ValueError as e:
        out["refused_budget"] = str(e)
    return out


def test_fsdp2_hybrid_sharding_compresses_the_replicate_all_reduce():
    res = run_ranks(_worker, 4)
    n_groups = 4  # three Linear modules + the root (no parameters of its own: not hooked)
    for rank, r in enumerate(res):
        for name in ("exact", "low", "greedy"):
            st = r[name]
            assert st["agree"], f"rank {rank} {name}: replicas hold different shards"
            # the compressor ran for every module group of every step (counted), one step per optimizer step
            assert st["calls"] == [n_groups - 1] * STEPS, st["calls"]
            assert st["stats"]["steps"] == STEPS and st["stats"]["steps_by_phase"].get("compressed", 0) >= 2, st["stats"]
            assert st["stats"]["compressed_matrices"] >= 2
        # full rank equals FSDP2's own HSDP training
        torch.testing.assert_close(r["exact"]["full"], r["hsdp"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(r["low"]["full"], r["hsdp"], atol=1e-5)
        # rank 4: the cross-replica bytes after warm-up at least 4x fewer than dense
        st = r["low"]["stats"]
        dense_per_step = st["bytes_dense"] / st["steps"]
        comp_per_step = st["bytes_by_phase"]["compressed"] / st["steps_by_phase"]["compressed"]
        assert dense_per_step >= 4 * comp_per_step, (dense_per_step, comp_per_step)
        acc = r["accum_bf16"]
        assert acc["calls"] == [n_groups - 1] * STEPS and acc["stats"]["steps"] == STEPS, acc
        assert acc["agree"] and acc["finite"]
        assert r["resume"] == (True, 6), r["resume"]
        # two hooked groups (m[2]'s bias, m[4]); one step per optimizer step; m[4]'s weight compressed
        fr = r["frozen"]
        assert fr["calls"] == [2] * STEPS and fr["stats"]["steps"] == STEPS and fr["agree"], fr
        assert fr["stats"]["compressed_matrices"] == 1, fr["stats"]
        assert r["refused_hsdp"] and "native HSDP" in r["refused_hsdp"]
        assert r["refused_budget"] and "compression=4 is not supported with FSDP2" in r["refused_budget"] and \
            "give rank=r" in r["refused_budget"], r["refused_budget"]
    for name in ("exact", "low"):  # every rank holds the same full model
        for r in res[1:]:
            assert torch.equal(res[0][name]["full"], r[name]["full"])


def test_register_names_what_it_needs():
    from lorecomm.integrations import fsdp

    with pytest.raises(ValueError, match="either mesh="):
        fsdp.register(torch.nn.Linear(2, 2), rank=4)
    with pytest.raises(ValueError, match="must be a torch.distributed.ProcessGroup"):
        fsdp.register(torch.nn.Linear(2, 2), replicate_group="g", rank=4)
