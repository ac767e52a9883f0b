"""A dispatch mode that records which dinat_m2f ops run (below autograd, so a backward's ops too)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class RecordNativeOps(TorchDispatchMode):
    """Collects the names of the ``torch.ops.dinat_m2f`` ops called inside the ``with`` block, in order."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dinat_m2f":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))
