"""Peak bytes of live tensors created inside a block, counted op by op: a deterministic memory measure on CPU.

torch has no allocator statistics on CPU, and process RSS is noisy (allocator caching, other threads). This
mode sees every op's outputs (forward and backward, which autograd runs on the calling thread on CPU), tracks
their storages through weak references and records the largest sum of live storage bytes after any op.
Tensors that existed before the block (parameters, inputs) are not counted. Used by tests/test_logprobs.py and
bench/train_vs_trl.py --memory-curve; it slows ops down, so never wrap real training in it.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorPeak(TorchDispatchMode):
    """with LiveTensorPeak() as m: ...; m.peak_bytes -> the peak of live bytes of tensors made in the block."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0

    def _current(self) -> int:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        return sum(n for _, n in self._live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not a new allocation (e.g. a weight's transpose).
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" \
                    and StorageWeakRef(t.untyped_storage()).cdata not in inputs:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self._live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.peak_bytes = max(self.peak_bytes, self._current())
        return out
