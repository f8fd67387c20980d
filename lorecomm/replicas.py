"""Check that data-parallel replicas agree (for examples, tests and users' own sanity checks)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def replicas_identical(module: torch.nn.Module, group=None) -> bool:
    """True when every rank of ``group`` holds bit-identical parameters of ``module``.

    A collective (one all-gather of a fingerprint per rank): call it on every rank.
    """
    flat = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
    bits = flat.view(torch.int32).to(torch.int64)
    fp = torch.stack([bits.sum(), (bits * torch.arange(1, bits.numel() + 1, device=bits.device)).sum()]).cpu()
    n = dist.get_world_size(group)
    out = [torch.empty_like(fp) for _ in range(n)]
    dist.all_gather(out, fp, group=group)
    return all(torch.equal(out[0], o) for o in out)
