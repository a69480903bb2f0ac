"""PyTorch adapter: the :class:`ProjUNN` optimizer and unitary layers.

>>> import torch
>>> from unitary_lr.torch import ProjUNN, UnitaryRNN
>>> rnn = UnitaryRNN(8, 32)
>>> opt = ProjUNN(rnn.parameters(), lr=1e-3)   # weight_hh gets projUNN steps
>>> [group["unitary"] for group in opt.param_groups]
[False, True]
"""

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - torch is in the test extra
    raise ImportError("unitary_lr.torch needs PyTorch: pip install torch") from error

from .conv import FourierConv2d
from .layers import INITS, ModReLU, UnitaryRNN, unitary_parameter
from .optimizer import ProjUNN, is_unitary, mark_unitary

__all__ = ["INITS", "FourierConv2d", "ModReLU", "ProjUNN", "UnitaryRNN", "is_unitary", "mark_unitary", "unitary_parameter"]
