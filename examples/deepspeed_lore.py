"""Lore (lorecomm's default compressor) in a DeepSpeed engine (ZeRO stage 0, fp32).  Run (CPU or GPU):

    torchrun --nproc_per_node=2 examples/deepspeed_lore.py
    # or: deepspeed --num_gpus 2 examples/deepspeed_lore.py
"""
import argparse

import deepspeed
import torch
import torch.distributed as dist

import lorecomm
from lorecomm.integrations import deepspeed as lore_deepspeed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = ap.parse_args()

    if not torch.cuda.is_available():
        lore_deepspeed.skip_cpu_shm_op()  # optional: skip DeepSpeed's JIT-built CPU shm op
    deepspeed.init_distributed()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2,
                 "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    state = lore_deepspeed.register(engine, rank=8, start_step=5)  # <- the lorecomm line

    w_true = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).to(engine.device)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for step in range(args.steps * 2):  # 2 micro-batches per optimizer step
        x = torch.randn(32, 64, generator=g).to(engine.device)
        loss = ((engine(x) - x @ w_true) ** 2).mean()
        engine.backward(loss)  # lorecomm averages at the accumulation boundary
        engine.step()  # clips the averaged gradient, then steps
        if dist.get_rank() == 0 and step % 20 == 0:
            print(f"micro-step {step} loss {loss.item():.4f}")
    same = lorecomm.replicas_identical(engine.module)  # a collective: every rank checks
    if dist.get_rank() == 0:
        st = state.stats()
        print({k: st[k] for k in ("steps", "calls", "compression_ratio", "steps_by_phase")})
        print(f"replicas identical: {same}")
    # stop lorecomm's engine before the process group goes: no Gloo threads left at interpreter exit
    lorecomm.engine.shutdown_all()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
