"""DeepSpeed engine (ZeRO 0, fp32, gradient clipping on) with lorecomm on 2 Gloo ranks (CPU)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install lorecomm[integrations])")

STEPS = 5
GAS = 2  # micro-batches per optimizer step
STAGES = (0, 1, 2)
def configs(compressor: str):
    """(r = a, r < a) configurations of each compressor (the exact one reproduces dense training:
    GreedyLore's full basis, Lore on an fp32 wire)."""
    if compressor == "greedylore":
        base = dict(compressor="greedylore", start_step=1, update_interval=3, min_compression_rate=0.5)
    else:
        base = dict(start_step=1, wire=torch.float32, min_compression_rate=0.5)
    return dict(base, rank=8), dict(base, rank=2)



def _train(rank, lore, stage=0):
    import deepspeed
    import torch.distributed as dist

    from lorecomm.integrations import deepspeed as lore_deepspeed
    from lorecomm.integrations._launch import count_calls

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": GAS, "gradient_clipping": 1.0,
           "steps_per_print": 10 ** 9}
    if stage:
        # small buckets: several reductions per step (the last one partial), as in real runs
        cfg.update(zero_optimization={"stage": stage, "reduce_bucket_size": 100, "allgather_bucket_size": 1000},
                   zero_allow_untested_optimizer=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    state, calls = None, []
    if lore is not None:
        state = lore_deepspeed.register(engine, **lore)
        calls = count_calls(state)
    g = torch.Generator().manual_seed(100 + rank)
    norms = []
    for _ in range(STEPS):
        calls.append(0)
        for _ in range(GAS):
            x = torch.randn(4, 8, generator=g)
            y = 5 * torch.randn(4, 8, generator=g)
            engine.backward(((engine(x) - y) ** 2).sum())
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and not stage:
                # the averaged gradient, before engine.step() clips it
                norms.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item())
            engine.step()
            if boundary and stage:  # ZeRO keeps the gradients in partitions: the norm it clipped by
                norms.append(float(engine.get_global_grad_norm()))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks hold different parameters"
    return dict(params=flat, stats=state.stats() if state else None, calls=calls, norms=norms)


def _refusal(extra_cfg):
    import deepspeed

    from lorecomm.integrations import deepspeed as lore_deepspeed

    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True, **extra_cfg}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    try:
        lore_deepspeed.register(engine, rank=4)
    except NotImplementedError as e:
        return str(e)
    return None


def _comm_dtype_warning():
    import warnings

    import deepspeed

    from lorecomm.integrations import deepspeed as lore_deepspeed

    model = torch.nn.Linear(8, 8)
    cfg = {"train_micro_batch_size_per_gpu": 4, "communication_data_type": "bf16"}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                           config=cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lore_deepspeed.register(engine, rank=4)
    return [str(w.message) for w in caught if "communication_data_type" in str(w.message)]


def _worker(rank, world_size, compressor):
    import deepspeed

    from lorecomm.integrations import deepspeed as lore_deepspeed

    lore_deepspeed.skip_cpu_shm_op()  # no JIT build of DeepSpeed's CPU shm op in tests
    deepspeed.init_distributed(dist_backend="gloo")
    exact, low = configs(compressor)
    out = {}
    for stage in STAGES:
        out[stage] = dict(dense=_train(rank, None, stage), exact=_train(rank, exact, stage),
                          low=_train(rank, low, stage))
    out["comm_dtype"] = _comm_dtype_warning()
    # last: a ZeRO-3 engine changes process-wide DeepSpeed state that later engines would see
    # (torch_autocast too leaves process-wide state behind: the autocast refusals come after the others)
    out["refused"] = [_refusal({"managed_gradient_accumulation": False, "zero_optimization": {"stage": 2}}),
                      _refusal({"zero_optimization": {"stage": 3}}),
                      _refusal({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}),  # loss-scaled
                      _refusal({"torch_autocast": {"enabled": True, "dtype": "torch.float16"},
                                "zero_optimization": {"stage": 1}})]  # ZeRO's own GradScaler
    return out


@pytest.mark.parametrize("compressor", ["lore", "greedylore"])
def test_deepspeed_two_ranks(compressor):
    from lorecomm.integrations._launch import run_ranks

    results = run_ranks(_worker, 2, compressor)
    r0 = results[0]
    for stage in STAGES:
        r = r0[stage]
        for key in ("exact", "low"):
            st = r[key]["stats"]
            assert st["steps"] == STEPS and st["steps_by_phase"]["compressed"] >= 2, (stage, st)
            assert st["compressed_matrices"] == 2, (stage, st)
            if stage == 0:  # one bucket (all fp32 grads) per optimizer step, counted
                assert r[key]["calls"] == [1] * STEPS and st["calls"] == STEPS, r[key]["calls"]
            else:  # several ZeRO buckets per reduction; stage 2 reduces every micro-batch
                per_step = r[key]["calls"]
                assert len(set(per_step)) == 1 and per_step[0] >= (2 if stage == 1 else 2 * GAS), (stage, per_step)
        # clipping was active (averaged gradient norm > 1.0), and it ran on the averaged reconstructed gradient:
        # with r = a the run equals DeepSpeed's own dense training (ZeRO: each rank's partition of it)
        assert max(r["dense"]["norms"]) > 1.0
        torch.testing.assert_close(r["exact"]["params"], r["dense"]["params"], rtol=1e-5, atol=1e-6)
        if stage == 0:
            torch.testing.assert_close(r["exact"]["norms"], r["dense"]["norms"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(r["low"]["params"], r["dense"]["params"], atol=1e-6), stage
        assert r["low"]["stats"]["bytes_by_phase"]["compressed"] < r["exact"]["stats"]["bytes_by_phase"]["compressed"]
        for key in ("dense", "exact", "low"):
            assert torch.equal(results[0][stage][key]["params"], results[1][stage][key]["params"])
    assert len(r0["comm_dtype"]) == 1 and "is not used: lorecomm sends what its state says" in r0["comm_dtype"][0]
    unmanaged, zero3, fp16_autocast, fp16_autocast_zero1 = r0["refused"]
    assert zero3 is not None and "ZeRO stage 3" in zero3 and "partitions the parameters" in zero3
    assert fp16_autocast is not None and "GradScaler" in fp16_autocast
    assert fp16_autocast_zero1 is not None and "GradScaler" in fp16_autocast_zero1
    assert unmanaged is not None and "managed_gradient_accumulation=false with ZeRO" in unmanaged, unmanaged
