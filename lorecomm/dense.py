"""Dense all-reduce through the same runtime and byte accounting (the baseline)."""

import torch

from .plan import BucketPlan
from .state import CommState

_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


class DenseState(CommState):
    """Plain averaging, optionally cast to ``dtype`` (e.g. bf16) on the wire."""

    def __init__(self, process_group=None, dtype: torch.dtype | None = None):
        super().__init__(process_group, dense_name_patterns=())
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of None, torch.float32, torch.bfloat16, torch.float16; got {dtype!r}")
        self.dtype = dtype

    def config(self) -> dict:
        return {**super().config(), "dtype": str(self.dtype)}

    def _step_for(self, phase: str, plan: BucketPlan, buffer: torch.Tensor, t: int):
        from . import _C

        return _C.DenseStep(buffer, wire=self.dtype)


def dense_hook(state: DenseState, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, dense_hook)``."""
    if not isinstance(state, DenseState):
        raise TypeError(f"dense_hook needs a lorecomm.DenseState, got {type(state).__name__}")
    return state._hook(bucket)
