"""Counting the host/device transfers of a computation on CPU, as a GPU would see them.

``TransferCounter`` is a torch function mode that tracks which tensors would live on the
accelerator: the inputs it is told about, the results of any op on such tensors and of
factory calls given a ``device``. A call that needs their values on the host (``item``,
``tolist``, ``cpu``, ``bool()``, data-dependent shapes such as ``nonzero`` or boolean
indexing, ...) counts as device→host; moving a host tensor with ``.to(device)``, creating one
from Python data with a ``device``, or mixing a host tensor into an op on device tensors counts
as host→device.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor
TO_HOST = {
    Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.cpu, Tensor.__bool__, Tensor.__int__,
    Tensor.__float__, Tensor.__index__, Tensor.__array__,
}  # fmt: skip
SHAPE_FROM_DATA = {  # results stay on the device, but their size must be read first
    Tensor.nonzero, torch.nonzero, Tensor.unique, torch.unique, Tensor.masked_select,
    torch.masked_select, Tensor.bincount, torch.bincount, torch.argwhere, Tensor.argwhere,
}  # fmt: skip
FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor}


class TransferCounter(TorchFunctionMode):
    def __init__(self, device_tensors):
        super().__init__()
        self.on_device: dict[int, weakref.ref] = {}  # id → the tensor (dead refs: freed)
        for tensor in device_tensors:
            self._mark(tensor)
        self.counts: Counter[str] = Counter()

    def _mark(self, tensor) -> None:
        self.on_device[id(tensor)] = weakref.ref(tensor)

    def _resident(self, tensor) -> bool:
        ref = self.on_device.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        resident = [x for x in inputs if self._resident(x)]
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if resident and func in TO_HOST:
            self.counts[f"d2h:{name}"] += 1
            if isinstance(result, Tensor):  # a host copy (on CPU ``cpu()`` returns its input)
                self.on_device.pop(id(result), None)
            return result
        if resident and (
            func in SHAPE_FROM_DATA or _bool_index(func, args) or _tensor_repeats(func, args)
        ):
            self.counts[f"d2h:{name}"] += 1
        if func is Tensor.to and not resident and _moves_to_device(args, kwargs):
            self.counts[f"h2d:{name}"] += 1
            resident = [args[0]]
        elif func in FACTORIES_FROM_DATA and "device" in kwargs:
            self.counts[f"h2d:{name}"] += 1
            resident = [None]
        elif resident and any(not self._resident(x) for x in inputs):
            self.counts[f"h2d:mixed {name}"] += 1
        if resident or "device" in kwargs:
            for out in tree_flatten(result)[0]:
                if isinstance(out, Tensor):
                    self._mark(out)
        return result

    def total(self, direction: str) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith(direction))


def _bool_index(func, args) -> bool:
    if func not in (Tensor.__getitem__, Tensor.__setitem__) or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index)


def _tensor_repeats(func, args) -> bool:
    return func in (Tensor.repeat_interleave, torch.repeat_interleave) and any(
        isinstance(a, Tensor) for a in args[1:]
    )


def _moves_to_device(args, kwargs) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(t, (torch.device, str)) for t in targets)
