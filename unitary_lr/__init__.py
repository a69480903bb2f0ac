"""unitary_lr: keep trained matrices exactly unitary (complex) or orthogonal
(real) with rank-k projUNN updates that cost O(k n^2) instead of O(n^3).

One implementation written against the Python Array API standard: the same
functions take and return NumPy, CuPy, PyTorch, JAX or array_api_strict arrays
and keep them on their device.
"""

from .diagnostics import unitarity_error, unitarity_estimate
from .haar import random_unitary
from .householder import householder_apply, householder_product
from .polar import ConvergenceError, project_unitary, project_unitary_lowrank
from .rsvd import SVDResult, randomized_svd
from .steps import projunn_step, tangent_project
from .transport import cayley_transport, exp_transport

__version__ = "0.1.0.dev0"

__all__ = [
    "ConvergenceError",
    "SVDResult",
    "cayley_transport",
    "exp_transport",
    "householder_apply",
    "householder_product",
    "project_unitary",
    "project_unitary_lowrank",
    "projunn_step",
    "random_unitary",
    "randomized_svd",
    "tangent_project",
    "unitarity_error",
    "unitarity_estimate",
]
