"""The engine on CUDA buckets: NCCL at world size 1, two ranks with Gloo on CUDA tensors (both on one GPU:
NCCL refuses two ranks on one device), NCCL across two GPUs where present. Every compressor configuration
of test_compressors is held to the same float64 simulation with the same tolerances, replicas must be
bit-identical, and DDP trains with the default compressor on CUDA with identical replicas.

Without a GPU these skip (the CPU suite covers the same steps on CPU buckets); bench/gpu_check.sh runs them
with LORECOMM_TEST_DEVICE=cuda, where a missing GPU or a CPU-only engine build is an error, not a skip.
"""
from __future__ import annotations

import os

import pytest
import torch

from lorecomm import _C

from distributed import run_ranks
from test_compressors import CONFIGS, PARAMS, STEPS, _run_configs, check_against_simulation

GPU_RUN = (os.environ.get("LORECOMM_TEST_DEVICE") or "").startswith("cuda")
if not (torch.cuda.is_available() and _C.ENGINE_CUDA):
    why = ("torch.cuda is not available" if not torch.cuda.is_available()
           else "lorecomm._C was built without CUDA (LORECOMM_WITH_CUDA off)")
    if GPU_RUN:
        raise RuntimeError(f"LORECOMM_TEST_DEVICE={os.environ['LORECOMM_TEST_DEVICE']} but {why}")
    pytest.skip(f"CUDA engine tests: {why} (bench/gpu_check.sh runs them on a GPU)", allow_module_level=True)

GPUS = torch.cuda.device_count()
SETUPS = [
    pytest.param("nccl", 1, id="nccl-world1"),
    pytest.param("gloo", 2, id="gloo-2ranks-cuda-tensors"),
    pytest.param("nccl", 2, id="nccl-2gpus",
                 marks=pytest.mark.skipif(GPUS < 2, reason=f"NCCL across GPUs needs 2, this machine has {GPUS}")),
]


def _on_gpu(rank, world, backend):
    device = torch.device("cuda", rank % GPUS if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    return _run_configs(rank, world, CONFIGS, STEPS, PARAMS, device=device)


@pytest.mark.parametrize("backend,world", SETUPS)
def test_cuda_buckets_match_float64_simulation(backend, world):
    check_against_simulation(run_ranks(_on_gpu, world, backend, backend=backend), world, f"{backend} x{world} ")


def _train_ddp(rank, world, backend, compressor):
    import lorecomm
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device("cuda", rank % GPUS if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 8)).to(device)
    ddp = DDP(model, device_ids=[device.index], bucket_cap_mb=0.02)  # several buckets in flight
    state = lorecomm.register(ddp, compressor=compressor, rank=4, start_step=3)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(12):
        x = torch.randn(32, 64, generator=gen).to(device)
        y = torch.randint(0, 8, (32,), generator=gen).to(device)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = [p.detach().cpu() for p in model.parameters()]
    return params, losses, state.stats()


@pytest.mark.parametrize("compressor", ["lore", "greedylore"])
@pytest.mark.parametrize("backend,world", SETUPS)
def test_ddp_trains_on_cuda_with_identical_replicas(backend, world, compressor):
    out = run_ranks(_train_ddp, world, backend, compressor, backend=backend)
    params0, losses0, stats0 = out[0]
    assert all(torch.isfinite(torch.tensor(losses0))), losses0
    assert stats0["steps_by_phase"].get("compressed", 0) > 0, stats0["steps_by_phase"]
    for r in range(1, world):
        for a, b in zip(params0, out[r][0]):
            assert torch.equal(a, b), f"rank {r} diverged from rank 0"
