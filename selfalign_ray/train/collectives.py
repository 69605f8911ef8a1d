"""The only place in selfalign_ray that calls torch.distributed collectives (DeepSpeed's internals aside).

Why one place: NCCL has no CPU path, so a collective on a tensor that lives on the wrong device works in every
CPU (gloo) test and fails on the first GPU step. Every reduction goes through `Collectives`, which knows the
training device and refuses, with the tensor's and the expected device named, anything that lives elsewhere,
on gloo as on NCCL. tests/test_train_collectives.py fails if another module calls a collective directly.

Outside an initialised process group (one process, unit tests) the reductions are identities.
"""

from __future__ import annotations

import torch


class WrongDeviceError(RuntimeError):
    """A tensor handed to a collective does not live on the training device."""


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for a training device: NCCL for CUDA, gloo for CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def same_device(actual: torch.device, expected: torch.device) -> bool:
    """`cuda:1` is not `cuda:0`; an expected device without an index (`cuda`) accepts any index."""
    if actual.type != expected.type:
        return False
    return expected.index is None or actual.index == expected.index


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Collectives:
    """Reductions over all ranks, on tensors that live on `device` (the training device)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    @property
    def world_size(self) -> int:
        dist = _dist()
        return dist.get_world_size() if dist else 1

    @property
    def rank(self) -> int:
        dist = _dist()
        return dist.get_rank() if dist else 0

    def check(self, tensor: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}: collectives take tensors, got {type(tensor).__name__}")
        if not same_device(tensor.device, self.device):
            raise WrongDeviceError(f"{what} lives on {tensor.device}, but collectives run on the training device "
                                   f"{self.device} (NCCL cannot reduce CPU tensors; create it with "
                                   f"device=collectives.device)")
        return tensor

    def tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        """A new tensor on the training device (the way to build what goes into a reduction)."""
        return torch.as_tensor(values, dtype=dtype, device=self.device)

    def _reduce(self, tensor: torch.Tensor, op_name: str, what: str) -> torch.Tensor:
        self.check(tensor, what)
        dist = _dist()
        if dist is not None:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name))
        return tensor

    def sum_(self, tensor: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """In-place sum over all ranks (a collective: every rank must call it, in the same order)."""
        return self._reduce(tensor, "SUM", what)

    def min_(self, tensor: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """In-place minimum over all ranks."""
        return self._reduce(tensor, "MIN", what)

    def max_(self, tensor: torch.Tensor, what: str = "tensor") -> torch.Tensor:
        """In-place maximum over all ranks."""
        return self._reduce(tensor, "MAX", what)

    def barrier(self) -> None:
        """Wait for every rank (through a one-element reduction on the training device, so that NCCL's
        barrier never has to guess a device)."""
        self.sum_(torch.zeros(1, device=self.device), "barrier")
