"""How far a matrix is from the unitary group (floor 4)."""

from __future__ import annotations

import math

from ._validation import check_float_dtype, check_matrix, namespace_of
from ._xp import core_dtype, device, eye, mH

__all__ = ["unitarity_error"]


def unitarity_error(W, /):
    r"""``||W^H W - I||_F / sqrt(n)`` for each matrix of a batch.

    Parameters
    ----------
    W : array, shape (..., n, n)

    Returns
    -------
    array, shape (...)
        Real, computed (and returned) in float64 where the device has it, so the
        drift of float32 matrices is measured above float32 rounding. 0-d for a
        single matrix; ``float(unitarity_error(W))`` gives a Python number.

    Raises
    ------
    TypeError
        W is not an array of a supported floating dtype.
    ValueError
        W is not square.

    Notes
    -----
    Dense, O(n^3): a diagnostic. For an error e per entry of W^H W the value is
    about e * sqrt(n), and it is 0 exactly for a permutation matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import unitarity_error
    >>> float(unitarity_error(np.eye(3)))
    0.0
    >>> round(float(unitarity_error(2 * np.eye(4))), 6)
    3.0
    """
    xp = namespace_of(W=W)
    check_float_dtype(xp, "W", W)
    check_matrix("W", W, square=True)
    core = core_dtype(xp, W.dtype, device(W))
    Wc = xp.astype(W, core, copy=False)
    n = W.shape[-1]
    return xp.linalg.matrix_norm(mH(xp, Wc) @ Wc - eye(xp, n, like=Wc)) / math.sqrt(n)
