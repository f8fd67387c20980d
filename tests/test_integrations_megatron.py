"""megatron-core DDP with lorecomm on 2 Gloo ranks (CPU)."""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

def _has_megatron_core() -> bool:
    # find_spec("megatron.core") raises, not returns None, when "megatron" itself is missing
    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


pytestmark = pytest.mark.skipif(not _has_megatron_core(),
                                reason="megatron-core is not installed (pip install lorecomm[integrations])")

STEPS = 5
# overlap_grad_reduce off (one bucket); on (two buckets, 2 micro-batches with no_sync); distributed optimizer
# (reduce-scatter path, overlap on, two buckets, sharded SGD step + param all-gather)
MODES = ("sync", "overlap", "distopt")
# r = a: every matrix below is 16x8 or 8x16, a = 8

def configs(compressor: str):
    """(r = a, r < a) configurations of each compressor (the exact one reproduces dense training:
    GreedyLore's full basis, Lore on an fp32 wire)."""
    if compressor == "greedylore":
        base = dict(compressor="greedylore", start_step=1, update_interval=3, min_compression_rate=0.5)
    else:
        base = dict(start_step=1, wire=torch.float32, min_compression_rate=0.5)
    return dict(base, rank=8), dict(base, rank=2)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))


def _train(rank, overlap, lore, microbatches=1, distopt=False):
    """STEPS optimizer steps; returns (flat params, state stats, compressor calls per step)."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from lorecomm.integrations import megatron as lore_megatron
    from lorecomm.integrations._launch import count_calls

    tcfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    # bucket_size=40 elements: two buckets (second layer, first layer) when overlapping
    dcfg = DistributedDataParallelConfig(overlap_grad_reduce=overlap, bucket_size=40 if overlap else None,
                                         use_distributed_optimizer=distopt)
    model = _model()
    ddp = DistributedDataParallel(tcfg, dcfg, model)
    calls = []
    state = None
    if lore is not None:
        state = lore_megatron.register(ddp, **lore)
        calls = count_calls(state)  # count the compressor calls ourselves
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        calls.append(0)
        ddp.zero_grad_buffer()
        for mb in range(microbatches):
            x = torch.randn(6, 8, generator=g)
            y = torch.randn(6, 8, generator=g)
            ctx = ddp.no_sync() if mb < microbatches - 1 else contextlib.nullcontext()
            with ctx:
                loss = ((ddp(x) - y) ** 2).mean()
                loss.backward()
        ddp.finish_grad_sync()
        if distopt:
            # what megatron's distributed optimizer does, with plain SGD: update this rank's shard of each
            # bucket from its shard of the reduced gradient, then all-gather the parameters
            with torch.no_grad():
                for bg in ddp.bucket_groups:
                    for b in bg.buckets:
                        n = b.grad_data.numel() // dist.get_world_size()
                        b.param_data[rank * n:(rank + 1) * n] -= 0.1 * b.grad_data[rank * n:(rank + 1) * n]
            ddp.start_param_sync(force_sync=True)
        else:
            for p in model.parameters():
                p.grad = p.main_grad.clone()
            opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks hold different parameters"
    n_buckets = sum(len(bg.buckets) for bg in ddp.bucket_groups)
    return flat, (state.stats() if state is not None else None), calls, n_buckets


def _worker(rank, world_size, compressor):
    from megatron.core import parallel_state

    from lorecomm.integrations import _launch
    from lorecomm.integrations import megatron as lore_megatron

    lore_megatron.cpu_shim()
    _launch.init_gloo()
    parallel_state.initialize_model_parallel(1, 1)
    EXACT, LOW = configs(compressor)
    out = {}
    for mode in MODES:
        overlap, distopt = mode in ("overlap", "distopt"), mode == "distopt"
        mbs = 2 if overlap else 1
        dense, _, _, _ = _train(rank, overlap, None, mbs, distopt)
        exact, st_exact, calls_exact, nb = _train(rank, overlap, EXACT, mbs, distopt)
        low, st_low, calls_low, _ = _train(rank, overlap, LOW, mbs, distopt)
        out[mode] = dict(dense=dense, exact=exact, low=low, st_exact=st_exact, st_low=st_low,
                            calls_exact=calls_exact, calls_low=calls_low, buckets=nb)
    out["refused"] = _refusal()
    parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("compressor", ["lore", "greedylore"])
def test_megatron_ddp_two_ranks(compressor):
    """overlap off/on and the distributed optimizer, each: dense vs r = a vs r < a."""
    from lorecomm.integrations._launch import run_ranks

    results = run_ranks(_worker, 2, compressor)
    for mode in MODES:
        r = results[0][mode]
        assert r["buckets"] == (1 if mode == "sync" else 2)
        # the compressor ran for every bucket of every step
        assert r["calls_exact"] == [r["buckets"]] * STEPS, r["calls_exact"]
        assert r["calls_low"] == [r["buckets"]] * STEPS, r["calls_low"]
        for st in (r["st_exact"], r["st_low"]):
            assert st["steps"] == STEPS and st["calls"] == STEPS * r["buckets"]
            assert st["steps_by_phase"]["compressed"] >= 2 and st["compressed_matrices"] == 2, st
        # r = a reproduces megatron's own dense all-reduce training
        torch.testing.assert_close(r["exact"], r["dense"], rtol=1e-5, atol=1e-6)
        # a real compression (r < a) changes the trajectory and sends fewer bytes on compressed steps
        assert not torch.allclose(r["low"], r["dense"], atol=1e-6)
        assert r["st_low"]["bytes_by_phase"]["compressed"] < r["st_exact"]["bytes_by_phase"]["compressed"]
        # both ranks hold identical parameters (also asserted bitwise inside each rank)
        for key in ("dense", "exact", "low"):
            assert torch.equal(results[0][mode][key], results[1][mode][key])
    twice, fp16 = results[0]["refused"]
    assert twice is not None and "already registered" in twice
    assert fp16 is not None and "fp16 Megatron models are not supported" in fp16 and "use bf16" in fp16


def _refusal():
    """Registering the same model twice is refused (one state per model), and an fp16 model."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from lorecomm.integrations import megatron as lore_megatron

    tcfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(), _model())
    lore_megatron.register(ddp, rank=4)
    out = []
    try:
        lore_megatron.register(ddp, rank=4)
        out.append(None)
    except RuntimeError as e:
        out.append(str(e))
    fp16 = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True,
                             fp16=True)
    try:  # loss-scaled gradients
        lore_megatron.register(DistributedDataParallel(fp16, DistributedDataParallelConfig(), _model()), rank=4)
        out.append(None)
    except NotImplementedError as e:
        out.append(str(e))
    return out
