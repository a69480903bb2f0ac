"""What PyTorch ran: one ``TorchDispatchMode`` that records every aten
operation, for the tests that count operations, host reads, passes over
large data and allocations (import only where torch is installed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Op:
    """One aten operation: its name (``aten.mm.default``), whether it is a
    view (views launch nothing), whether it writes one of its inputs (in
    place or ``out=``), and the (entries, dtype) of its tensor inputs and
    outputs."""

    name: str
    view: bool
    writes_input: bool
    inputs: tuple
    outputs: tuple

    def touches(self, size):
        """Whether it reads or writes a tensor of at least ``size`` entries."""
        return any(entries >= size for entries, _ in self.inputs + self.outputs)


def _tensors(tree):
    return tuple((t.numel(), t.dtype) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class AtenOps(TorchDispatchMode):
    """Records every aten operation run while it is active, in order
    (``with AtenOps() as ops: ...``; ``ops.ops`` is the list of :class:`Op`)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "aten":
            writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
            self.ops.append(Op(str(func), func.is_view, writes, _tensors((args, kwargs)), _tensors(out)))
        return out

    @property
    def launching(self):
        """The names of the operations that are not views."""
        return [op.name for op in self.ops if not op.view]

    @property
    def scalar_reads(self):
        """How many operations read a value back to the host (``.item()``, ``bool()``)."""
        return sum("_local_scalar_dense" in op.name for op in self.ops)

    def touching(self, size):
        """The names of the non-view operations that read or write a tensor of
        at least ``size`` entries: the passes over large data."""
        return [op.name for op in self.ops if not op.view and op.touches(size)]

    def new_tensors(self, size):
        """The names of the non-view operations that return a new tensor (not in
        place, not ``out=``) of at least ``size`` entries: the allocations."""
        return [op.name for op in self.ops
                if not op.view and not op.writes_input and any(entries >= size for entries, _ in op.outputs)]

    def writes(self, size):
        """(name, dtype) of each tensor of exactly ``size`` entries that a
        non-view operation returns."""
        return [(op.name, dtype) for op in self.ops if not op.view for entries, dtype in op.outputs if entries == size]

    @property
    def largest_output(self):
        """The most entries of any tensor an operation returned (0 if none)."""
        return max((entries for op in self.ops for entries, _ in op.outputs), default=0)
