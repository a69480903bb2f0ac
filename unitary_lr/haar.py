"""Haar-random unitary and orthogonal matrices."""

from __future__ import annotations

import operator

import numpy as np

from ._host import from_host, own_transfers, staged
from ._random import as_generator, host_normal
from ._validation import check_int, describe
from ._xp import (FLOAT_DTYPE_NAMES, _is_jax, array_namespace, dtype_name, exact_products, is_array_api_obj, mH,
                  reduced_qr, row_layout, supports_float64)

__all__ = ["random_unitary"]


@exact_products
def random_unitary(n, m=None, /, *, dtype, batch_shape=(), rng=None, xp=None, device=None):
    r"""Draw unitary (complex dtype) or orthogonal (real dtype) matrices from
    the Haar measure.

    Parameters
    ----------
    n : int
        Number of rows, ``n >= 1``.
    m : int, optional
        Number of columns, ``m >= 1``; ``n`` when omitted (square). For
        ``m < n`` the columns are orthonormal: the first m columns of a Haar
        unitary, Haar distributed on the Stiefel manifold; for ``m > n`` the
        rows are (the conjugate transpose of an m x n draw).
    dtype : dtype or str
        A dtype of ``xp`` or its name: ``"float32"``, ``"float64"``,
        ``"complex64"`` or ``"complex128"``. Real dtypes give orthogonal
        matrices (Haar on O(n)), complex dtypes unitary ones (Haar on U(n)).
    batch_shape : tuple of int, optional
        Leading axes; the result has shape ``(*batch_shape, n, m)`` with
        independent draws.
    rng : None, int or numpy.random.Generator, optional
        The Gaussian draws come from NumPy on the host, so the same seed gives
        the same matrices (to rounding) on every backend and device.
    xp : namespace, optional
        Array namespace of the result (``numpy``, ``torch``, ``jax.numpy``,
        ``cupy``, ``array_api_strict`` ...); NumPy when omitted.
    device : optional
        Device of the result; the namespace's default device when omitted.

    Returns
    -------
    array of shape ``(*batch_shape, n, m)``
        Stored row by row (C order) in every library with strides, whatever
        layout its QR returns.

    Raises
    ------
    TypeError
        dtype is not one of the four supported floating dtypes of ``xp`` (an
        array in its place among them), or is 64-bit on a device without
        float64.
    ValueError
        n < 1, m < 1, a negative batch size, or a device that ``xp`` cannot
        make arrays on (named, with the namespace's reason).

    Notes
    -----
    The Q factor of a Gaussian matrix ``Z = Q R`` with the phases of diag(R)
    moved into Q (``Q diag(R_ii / |R_ii|)``) is Haar distributed (Mezzadri,
    2007); for m < n the same holds for the reduced QR of an n x m Gaussian
    matrix. The QR runs on the target device; O(n m min(n, m)). A square draw
    takes the same numbers whether m is omitted or given.

    Examples
    --------
    >>> from unitary_lr import random_unitary, unitarity_error
    >>> W = random_unitary(8, dtype="complex128", batch_shape=(3,), rng=0)
    >>> W.shape
    (3, 8, 8)
    >>> bool((unitarity_error(W) < 1e-14).all())
    True
    >>> V = random_unitary(8, 3, dtype="float64", rng=0)  # V^T V = I_3
    >>> V.shape, bool(unitarity_error(V) < 1e-14)
    ((8, 3), True)
    """
    n = check_int("n", n, minimum=1)
    m = n if m is None else check_int("m", m, minimum=1)
    batch_shape = check_batch_shape(batch_shape)
    try:
        # Maps numpy, cupy and torch modules onto the standard; keeps the others.
        with own_transfers(xp):  # JAX's empty array is a transfer of the library's own
            xp = array_namespace((np if xp is None else xp).empty(0))
    except Exception:
        raise TypeError(f"xp must be an array namespace such as numpy or torch, got {xp!r}") from None
    dtype = _float_dtype(xp, dtype)
    placed = device is not None
    if device is None:
        device = xp.__array_namespace_info__().default_device()
    else:
        _check_device(xp, device)
    if dtype_name(xp, dtype) in ("float64", "complex128") and not supports_float64(xp, device):
        where = f"device {device!r}" if device is not None else f"the default device of {xp.__name__}"
        hint = "; JAX has 64-bit dtypes once jax.config.update('jax_enable_x64', True)" if _is_jax(xp) else ""
        raise TypeError(f"dtype {dtype_name(xp, dtype)} is not available on {where}{hint}")
    rows, columns = max(n, m), min(n, m)
    # the host draw goes with the call of the staged factorization (see
    # _host.staged), which JAX runs on its default device: sent first where
    # another device is asked for (the result was on the default one)
    Z = from_host(xp, host_normal(xp, (*batch_shape, rows, columns), dtype=dtype, rng=as_generator(rng)),
                  dtype=dtype, device=device, staged=not placed)
    return _haar_factor(xp, Z, wide=n < m)


def _float_dtype(xp, dtype):
    """``dtype`` (a dtype of ``xp`` or its name) as the dtype of ``xp``; a
    TypeError naming it and showing it where it is not one of the four
    supported floating dtypes. An array is refused before any comparison:
    ``array == xp.float32`` compares the array's entries (NumPy's raised an
    error about ``__array_wrap__`` that named neither dtype nor its value)."""
    if isinstance(dtype, str):
        found = getattr(xp, dtype, None) if dtype in FLOAT_DTYPE_NAMES else None
    elif is_array_api_obj(dtype) and not isinstance(dtype, type):  # (NumPy's scalar types pass as arrays)
        raise TypeError(f"dtype must be a dtype or its name, not an array: got {type(dtype).__name__} "
                        f"{describe(dtype)}; for the dtype of an array x pass x.dtype")
    else:
        try:
            found = dtype if dtype_name(xp, dtype) is not None else None
        except Exception:  # an object whose == does not compare with a dtype
            found = None
    if found is None:
        raise TypeError(
            f"dtype must be one of {', '.join(FLOAT_DTYPE_NAMES)} (a dtype of {xp.__name__} "
            f"or its name), got {describe(dtype)}"
        )
    return found


def _check_device(xp, device):
    """A ValueError naming ``device`` where ``xp`` cannot make an array on it."""
    try:
        xp.empty((0,), dtype=xp.float32, device=device)  # (no kernel: no data)
    except Exception as error:
        raise ValueError(f"device {device!r} is not available to {xp.__name__}: {error}") from None


@staged("wide")
def _haar_factor(xp, Z, *, wide):
    """The Haar-distributed Q of the Gaussian Z (tall): QR with R's diagonal
    made positive (Mezzadri's correction), conjugate-transposed for a wide
    result, stored row by row."""
    Q, R = reduced_qr(xp, Z)
    d = xp.linalg.diagonal(R)
    magnitude = xp.astype(xp.abs(d), d.dtype)
    nonzero = magnitude != 0
    # |R_ii| > 0 with probability one; the guard keeps an exact zero harmless.
    phase = xp.where(nonzero, d / xp.where(nonzero, magnitude, xp.ones_like(d)), xp.ones_like(d))
    Q = Q * phase[..., None, :]
    return row_layout(xp, mH(xp, Q) if wide else Q)



def check_batch_shape(batch_shape):
    """``batch_shape`` as a tuple of Python ints. Sizes are accepted as n is:
    any integer type (NumPy's np.int64 from a .shape or an arithmetic result
    too), through operator.index; bool and floats are not sizes, and no size
    is negative."""
    try:
        sizes = tuple(batch_shape)
    except TypeError:
        sizes = None
    if sizes is None or not all(_is_integer(s) for s in sizes):
        raise TypeError(f"batch_shape must be a tuple of ints, got {batch_shape!r}")
    batch_shape = tuple(operator.index(s) for s in sizes)
    if any(s < 0 for s in batch_shape):
        raise ValueError(f"batch_shape must not have negative sizes, got {batch_shape!r}")
    return batch_shape


def _is_integer(value):
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
