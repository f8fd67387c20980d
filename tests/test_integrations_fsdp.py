"""FSDP2 is refused with the reason (no process group needed)."""
from __future__ import annotations

import pytest


def test_fsdp2_refused_with_reason():
    from lorecomm.integrations import fsdp

    with pytest.raises(NotImplementedError) as exc:
        fsdp.register(object(), rank=32)
    msg = str(exc.value)
    assert msg == fsdp.REASON
    for needle in ("FSDP2", "set_all_reduce_hook", "already-reduced shard", "set_custom_reduce_scatter",
                   "whole local gradient"):
        assert needle in msg


def test_fsdp2_hooks_exist_as_described():
    """The reason names torch's real extension points: fail loudly if torch renames them."""
    from torch.distributed.fsdp import FSDPModule

    assert hasattr(FSDPModule, "set_all_reduce_hook") and hasattr(FSDPModule, "set_custom_reduce_scatter")
