"""Lore (lorecomm's default compressor) with Hugging Face Accelerate.  Run (CPU or GPU):

    accelerate launch --num_processes 2 [--cpu] examples/accelerate_lore.py
    # or: torchrun --nproc_per_node=2 examples/accelerate_lore.py
"""
import torch
from accelerate import Accelerator

import lorecomm
from lorecomm.integrations import accelerate as lore_accelerate


def main():
    # on a CPU-only machine Accelerate runs distributed (Gloo) only with cpu=True
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4096, 64)
    y = x @ torch.randn(64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # NOT DistributedDataParallelKwargs(comm_hook=...): Accelerate ignores callables there
    state = lore_accelerate.register(accelerator, model, rank=8, start_step=5)  # <- lorecomm

    for i, (xb, yb) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = ((model(xb) - yb) ** 2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.is_main_process and i % 20 == 0:
            print(f"batch {i} loss {loss.item():.4f}")
        if i >= 59:
            break
    same = lorecomm.replicas_identical(model)  # a collective: every rank checks
    if accelerator.is_main_process and state is not None:
        st = state.stats()
        print({k: st[k] for k in ("steps", "calls", "compression_ratio", "steps_by_phase")})
        print(f"replicas identical: {same}")
    # stop lorecomm's engine before the process group goes: no Gloo threads left at interpreter exit
    lorecomm.engine.shutdown_all()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
