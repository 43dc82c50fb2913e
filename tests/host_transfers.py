"""Count what would be a host<->device transfer on CUDA, by watching torch calls on CPU.

On CPU nothing blocks, but the calls that read a device value back (``item``, ``tolist``,
``numpy``, ``cpu``, ``bool()``/``int()``/``float()`` of a tensor, boolean-mask indexing,
``nonzero``, ``unique``, ``bincount``, ...) or that create a tensor from Python / NumPy data
(``torch.tensor``, ``as_tensor``, ``from_numpy``) are the same calls that make a CUDA stream
wait for the host. ``.to(device)`` is not counted (on CPU it cannot tell a device copy from
a no-op); ``.to("cpu")`` written out is. Counted calls on tensors that stay on the host on
CUDA too (e.g. NumPy data for SciPy) are no device transfers: read the counts with the code.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "bincount",
    "masked_select",
}
CREATIONS = {"tensor", "as_tensor"}


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostTransferCounter(TorchFunctionMode):
    """``with HostTransferCounter() as counter:`` ... ``counter.reads``, ``counter.creations``
    (``Counter`` by call name); ``counter.active = False`` pauses counting."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.creations: Counter[str] = Counter()
        self.active = True
        self._from_numpy = torch.from_numpy

    def __enter__(self) -> HostTransferCounter:
        original = self._from_numpy

        def counted_from_numpy(array: Any) -> torch.Tensor:
            if self.active:
                self.creations["from_numpy"] += 1
            return original(array)

        torch.from_numpy = counted_from_numpy
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.from_numpy = self._from_numpy
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.active:
            name = getattr(func, "__name__", "")
            if name in READS:
                self.reads[name] += 1
            elif name in CREATIONS:
                self.creations[name] += 1
            elif name == "__getitem__" and len(args) > 1 and _bool_index(args[1]):
                self.reads["bool-mask index"] += 1
            elif name == "to" and "cpu" in (*args[1:2], kwargs.get("device")):
                self.reads["to('cpu')"] += 1
            elif name == "repeat_interleave" and isinstance(
                kwargs.get("repeats", args[1] if len(args) > 1 else None), torch.Tensor
            ):
                self.reads["repeat_interleave(tensor)"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.reads.values()) + sum(self.creations.values())
