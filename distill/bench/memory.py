"""Peak memory of a block of work: CUDA's allocator counters, or on CPU the bytes of live tensor
storages tracked op by op (a TorchDispatchMode), since the CPU allocator keeps no counter."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distill.bench.flops import _sync


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at the same time.

    Every op's fresh outputs are counted when made and released when their storage is freed (a
    weak reference on the storage). Views, in-place and out= ops (outputs that alias inputs) add
    nothing, so tensors that existed before the block are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage(), inputs)
        return out

    def _add(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._refs or size == 0 or storage.data_ptr() in inputs:
            return
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))

    def _free(self, key: int, size: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live_bytes -= size


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in modules, optimizers and tensor lists."""
    seen: dict[int, int] = {}

    def add(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                add(tensor)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        add(value)
        elif isinstance(obj, torch.Tensor):
            add(obj)
    return sum(seen.values())


class PeakMemory:
    """Peak allocated bytes during a `with` block (`peak_bytes`), and above its start (`added_bytes`).

    CUDA: the allocator's own counters (peak reset on entry). CPU: the tracked live storages plus
    `base_bytes`, what the caller says was held before the block (weights, optimizer state).
    """

    def __init__(self, device: torch.device, base_bytes: int = 0) -> None:
        self.device = device
        self.base_bytes = base_bytes
        self.peak_bytes = 0
        self.start_bytes = 0
        self._tracker: TensorMemoryTracker | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.base_bytes
            self._tracker = TensorMemoryTracker().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self.base_bytes + self._tracker.peak_bytes

    @property
    def added_bytes(self) -> int:
        """Peak above the level at entry."""
        return self.peak_bytes - self.start_bytes
