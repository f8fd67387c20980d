"""Lore (lorecomm's default compressor) in megatron-core DDP.  Run (CPU or GPU):

    torchrun --nproc_per_node=2 examples/megatron_lore.py [--overlap]

(``compressor="greedylore", update_interval=...`` in the register line runs the paper's GreedyLore.)
"""
import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer import TransformerConfig

import lorecomm
from lorecomm.integrations import megatron as lore_megatron


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--overlap", action="store_true", help="overlap_grad_reduce=True")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    lore_megatron.cpu_shim()  # no-op with CUDA; lets megatron allocate its buffers on CPU otherwise
    dist.init_process_group("nccl" if cuda else "gloo")
    parallel_state.initialize_model_parallel(1, 1)
    device = "cuda" if cuda else "cpu"

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=1, use_cpu_initialization=not cuda)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=args.overlap), model)
    state = lore_megatron.register(ddp, rank=8, start_step=5)  # <- the lorecomm line

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w_true = torch.randn(64, 64, device=device, generator=torch.Generator(device).manual_seed(1))
    g = torch.Generator(device).manual_seed(100 + dist.get_rank())
    for step in range(args.steps):
        ddp.zero_grad_buffer()
        x = torch.randn(32, 64, device=device, generator=g)
        loss = ((ddp(x) - x @ w_true) ** 2).mean()
        loss.backward()
        ddp.finish_grad_sync()  # megatron's finalize_model_grads does this in real training
        for p in model.parameters():
            p.grad = p.main_grad
        opt.step()
        if dist.get_rank() == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}")
    same = lorecomm.replicas_identical(model)  # a collective: every rank checks
    if dist.get_rank() == 0:
        st = state.stats()
        print({k: st[k] for k in ("steps", "calls", "compression_ratio", "steps_by_phase")})
        print(f"replicas identical: {same}")
    # stop lorecomm's engine before the process group goes: no Gloo threads left at interpreter exit
    lorecomm.engine.shutdown_all()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
