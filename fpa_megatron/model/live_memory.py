"""An honest counter of live tensor bytes on any device, CPU included: `LiveTensorBytes`.

A TorchDispatchMode that sees every tensor an op returns (forward, backward, recomputation, collectives),
registers each new storage once with its size, and drops it when torch frees the storage (a weakref
finalizer on the storage object, which torch keeps alive exactly as long as the storage). `peak` is the
largest sum of live bytes seen between two ops. Storages that existed before the mode (parameters, inputs)
are not counted: an output that shares an input's storage the mode has not seen is one of them. The
planner's tests check its memory model against what a real step holds with it.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created while the mode is active (all devices together)."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.trace = [] if trace else None  # (op, live bytes after it), when asked for
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # id of a live storage -> bytes counted for it
        self._old: set[int] = set()  # storages that existed before the mode (parameters, inputs): not counted
        self._op, self.peak_at = "", ""  # the op after which the peak was reached (for reading a trace)

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._old.discard(key)

    def _track(self, tensor: torch.Tensor, input_storages: set) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        known = self._sizes.get(key)
        if known is None and key in input_storages:  # a view of (or out= into) a tensor from before the mode
            self._sizes[key] = 0
            self._old.add(key)
            weakref.finalize(storage, self._freed, key)
        elif known is None:
            self._sizes[key] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._freed, key)
        elif known != nbytes and key not in self._old:  # an op resized an existing storage (out= kernels)
            self._sizes[key] = nbytes
            self.live += nbytes - known
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self._op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(x.untyped_storage()) for x in tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor) and x.device.type != "meta"}
        out = func(*args, **kwargs)
        self._op = str(func)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf, inputs)
        if self.trace is not None:
            self.trace.append((self._op, self.live))
        return out

    def reset_peak(self) -> None:
        self.peak = self.live
