"""Hugging Face Accelerate (MULTI_CPU, Gloo) with lorecomm on 2 ranks."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="accelerate is not installed (pip install lorecomm[integrations])")

STEPS = 4
GAS = 2
def configs(compressor: str):
    """(r = a, r < a) configurations of each compressor (the exact one reproduces dense training:
    GreedyLore's full basis, Lore on an fp32 wire)."""
    if compressor == "greedylore":
        base = dict(compressor="greedylore", start_step=1, update_interval=3, min_compression_rate=0.5)
    else:
        base = dict(start_step=1, wire=torch.float32, min_compression_rate=0.5)
    return dict(base, rank=8), dict(base, rank=2)



def _train(rank, lore, kwargs_handlers=()):
    import warnings

    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from lorecomm.integrations import accelerate as lore_accelerate
    from lorecomm.integrations._launch import count_calls

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GAS, kwargs_handlers=list(kwargs_handlers))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    hook_registered = bool(model._get_ddp_logging_data().get("comm_hook"))
    state, calls, caught = None, [], []
    if lore is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = lore_accelerate.register(accelerator, model, **lore)
        calls = count_calls(state)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        calls.append(0)
        for _ in range(GAS):
            with accelerator.accumulate(model):
                x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
                accelerator.backward(((model(x) - y) ** 2).mean())
                opt.step()
                opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered), "ranks hold different parameters"
    return dict(params=flat, stats=state.stats() if state else None, calls=calls, hook_registered=hook_registered,
                warned=any("ignored by Accelerate" in str(w.message) for w in caught))


def _worker(rank, world_size, compressor):
    from accelerate import DistributedDataParallelKwargs

    import lorecomm

    # a callable comm_hook is silently dropped by Accelerate: the run stays dense
    ignored = DistributedDataParallelKwargs(comm_hook=lorecomm.lore_hook)
    exact, low = configs(compressor)
    return dict(dense=_train(rank, None, [ignored]), exact=_train(rank, exact, [ignored]), low=_train(rank, low),
                scaler_wired=_scaler_wired(low))


def _scaler_wired(cfg):
    """fp16 mixed precision: register hands the accelerator's GradScaler to the state (on CPU Accelerate
    makes none, so one is set as it would be on a GPU)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch.amp import GradScaler

    import lorecomm
    from lorecomm.integrations import accelerate as lore_accelerate

    wired = []
    for given in (False, True):
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(torch.nn.Linear(8, 8))
        accelerator.scaler = GradScaler("cpu")
        kw = dict(cfg)
        state = lorecomm.COMPRESSORS[kw.pop("compressor", "lore")](**kw) if given else None
        st = lore_accelerate.register(accelerator, model, state=state, **({} if given else kw))
        wired.append(st.grad_scaler is accelerator.scaler)
    return wired


@pytest.mark.parametrize("compressor", ["lore", "greedylore"])
def test_accelerate_register_on_prepared_model_two_ranks(compressor):
    from lorecomm.integrations._launch import run_ranks

    results = run_ranks(_worker, 2, compressor)
    r = results[0]
    assert not r["dense"]["hook_registered"]  # Accelerate ignored the callable comm_hook
    assert r["exact"]["warned"] and not r["low"]["warned"]
    for key in ("exact", "low"):
        # accumulate() -> no_sync: the compressor runs once per optimizer step, on every step (counted)
        assert r[key]["calls"] == [1] * STEPS, r[key]["calls"]
        st = r[key]["stats"]
        assert st["steps"] == STEPS and st["steps_by_phase"]["compressed"] >= 1 and st["compressed_matrices"] == 2
    torch.testing.assert_close(r["exact"]["params"], r["dense"]["params"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(r["low"]["params"], r["dense"]["params"], atol=1e-6)
    for key in ("dense", "exact", "low"):
        assert torch.equal(results[0][key]["params"], results[1][key]["params"])
    assert r["scaler_wired"] == [True, True], r["scaler_wired"]  # built by register, and given
