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

from ._mark import UnitaryParameter, is_unitary, mark_unitary, unitary_tolerance
from .adapters import (
    HouseholderAdapter,
    SVDAdapter,
    adapter_state_dict,
    add_householder_adapters,
    add_svd_adapters,
    load_adapter_state_dict,
    trainable_parameters,
)
from .constraints import orthogonal
from .conv import FourierConv2d
from .layers import INITS, ModReLU, UnitaryRNN, unitary_parameter
from .linear import OrthogonalLinear
from .optimizer import ProjUNN
from .retraction import projunn_retraction

__all__ = [
    "INITS",
    "FourierConv2d",
    "HouseholderAdapter",
    "ModReLU",
    "OrthogonalLinear",
    "ProjUNN",
    "SVDAdapter",
    "UnitaryParameter",
    "UnitaryRNN",
    "adapter_state_dict",
    "add_householder_adapters",
    "add_svd_adapters",
    "is_unitary",
    "load_adapter_state_dict",
    "mark_unitary",
    "orthogonal",
    "projunn_retraction",
    "trainable_parameters",
    "unitary_parameter",
    "unitary_tolerance",
]
