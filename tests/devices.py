"""The device the op and kernel tests run their ops on: ``LORECOMM_TEST_DEVICE`` (unset: CPU, directly).

The tests build inputs and float64 references on the CPU. With ``LORECOMM_TEST_DEVICE=cuda``
(bench/gpu_check.sh) every op or launcher the tests call goes through :func:`on_device`: each tensor
argument's whole storage is copied to the device (so views keep their strides and offsets, and
arguments sharing a storage still share it there), the op runs there, and every storage is copied
back, so in-place results, and anything written outside a view, land in the CPU tensors the test
checks. ``LORECOMM_TEST_DEVICE=cpu`` runs the same copies on the CPU: what the dry run tests.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

DEVICE = os.environ.get("LORECOMM_TEST_DEVICE")  # None: CPU, no copies
COPIES = DEVICE is not None


def require_device() -> None:
    """Fail the calling module when the requested device is absent: LORECOMM_TEST_DEVICE=cuda (a GPU run)
    on a machine without CUDA must not pass as a CPU run."""
    if DEVICE and DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"LORECOMM_TEST_DEVICE={DEVICE} but torch.cuda is not available "
                           f"(torch {torch.__version__}); unset it to test on the CPU")


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class _Mover:
    def __init__(self):
        self.storages: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x):
        if isinstance(x, (list, tuple)):
            return type(x)(self(v) for v in x)
        if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
            return x
        key = x.untyped_storage().data_ptr()
        if key not in self.storages:
            host = _storage_bytes(x)
            self.storages[key] = (host, host.to(DEVICE, copy=True))
        dev = self.storages[key][1]
        return torch.empty(0, dtype=x.dtype, device=dev.device).set_(
            dev.untyped_storage(), x.storage_offset(), x.shape, x.stride())

    def copy_back(self):
        for host, dev in self.storages.values():
            host.copy_(dev)


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def on_device(fn):
    """fn run on DEVICE with the CPU arguments' storages copied there and back; results on the CPU."""
    if not COPIES:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        move = _Mover()
        out = fn(*move(args), **{k: move(v) for k, v in kwargs.items()})
        if DEVICE.startswith("cuda"):
            torch.cuda.synchronize()
        move.copy_back()
        return _to_cpu(out)

    return run


def to_device(args: tuple) -> tuple:
    """Arguments for a call the test makes itself (opcheck): on DEVICE, views preserved."""
    return _Mover()(args) if COPIES else args


class OnDevice:
    """A module or op namespace whose callables run through :func:`on_device`."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        value = getattr(self._target, name)
        return on_device(value) if callable(value) and not isinstance(value, type) else value
