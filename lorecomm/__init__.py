"""lorecomm: low-rank compressed gradient communication for data-parallel training.

>>> state = lorecomm.register(ddp_model, rank=32)      # GreedyLore, one line
"""
from __future__ import annotations

from .dense import DenseState, dense_hook
from .greedylore import GreedyLoreState, greedylore_hook
from .random_linear import RandomLinearState, random_linear_hook
from .state import CommState

__all__ = [
    "CommState", "DenseState", "GreedyLoreState", "RandomLinearState",
    "dense_hook", "greedylore_hook", "random_linear_hook", "hook_for", "register",
]

_HOOKS = {GreedyLoreState: greedylore_hook, RandomLinearState: random_linear_hook, DenseState: dense_hook}


def hook_for(state: CommState):
    """The DDP communication hook that runs ``state``."""
    for cls, hook in _HOOKS.items():
        if isinstance(state, cls):
            return hook
    raise TypeError(f"no lorecomm hook for {type(state).__name__}")


def register(ddp_model, state: CommState | None = None, **config) -> CommState:
    """Register a lorecomm hook on a DDP model and return its state.

    ``register(ddp, rank=32, ...)`` builds a GreedyLoreState from ``config``;
    ``register(ddp, state=lorecomm.RandomLinearState(...))`` uses the given one.
    The process group defaults to the DDP model's.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp_model, DDP):
        raise TypeError(
            f"lorecomm.register expects a torch.nn.parallel.DistributedDataParallel model, got "
            f"{type(ddp_model).__name__}; wrap it in DDP first (other stacks: see lorecomm.integrations)")
    if state is None:
        config.setdefault("process_group", ddp_model.process_group)
        state = GreedyLoreState(**config)
    elif config:
        raise ValueError(f"pass either a state or config keywords, not both (got {sorted(config)})")
    state.bind(ddp_model)
    ddp_model.register_comm_hook(state, hook_for(state))
    return state
