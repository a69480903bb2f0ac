"""Input checks shared by the public functions (floor 2).

Every check raises before any work is done, names the argument and shows the
offending value. TypeError: wrong type, dtype or mixed namespaces; ValueError:
shapes and values.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from ._host import is_jax_tracer, is_traced, staged, torch_graph_tracing
from ._xp import (
    untracked,
    FLOAT_DTYPE_NAMES,
    broadcast_shapes,
    device,
    dtype_name,
    is_array_api_obj,
    is_complex,
    known_namespace,
    namespace,
)


def describe(x) -> str:
    """``repr(x)``, at most 80 characters of it, for error messages."""
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def namespace_of(**arrays):
    """Array namespace shared by the named arrays.

    Raises TypeError when an argument is not an array or when the arrays come
    from different libraries, ValueError when they live on different devices.
    """
    namespaces = {}
    for name, x in arrays.items():
        xp = known_namespace(x)  # an array of a type seen before
        if xp is None:
            if isinstance(x, np.ma.MaskedArray):
                # (its mask is dropped by some operations and kept by others:
                # NumPy's broadcasting errors came from deep inside a step)
                raise TypeError(f"{name} is a NumPy masked array, which unitary_lr does not take: pass the array "
                                f"of its values, {name}.filled() or np.asarray({name})")
            if not is_array_api_obj(x) or isinstance(x, (bool, int, float, complex)):
                raise TypeError(
                    f"{name} must be an array (NumPy, CuPy, PyTorch, JAX or any Array API "
                    f"library), got {type(x).__name__}: {describe(x)}"
                )
            xp = namespace(x)
        namespaces[name] = xp
    first_name, xp = next(iter(namespaces.items()))
    for name, other in namespaces.items():
        if other is not xp:
            raise TypeError(
                f"{first_name} is a {type(arrays[first_name]).__module__}."
                f"{type(arrays[first_name]).__name__} but {name} is a "
                f"{type(arrays[name]).__module__}.{type(arrays[name]).__name__}; "
                "pass arrays from one library"
            )
    # A traced JAX array has no device (None): it cannot be told apart, and
    # the trace itself puts every array on one device.
    devices = {name: device(x) for name, x in arrays.items()}
    first_device = next((d for d in devices.values() if d is not None), None)
    for name, x in arrays.items():
        if devices[name] is not None and devices[name] != first_device:
            raise ValueError(
                f"{first_name} is on device {first_device!r} but {name} is on device "
                f"{devices[name]!r}; move them to one device"
            )
    return xp


def check_float_dtype(xp, name, x):
    """x must have one of the four supported floating dtypes; returns its name."""
    found = dtype_name(xp, x.dtype)
    if found is None:
        native = _native_byte_order(x.dtype)
        if native is not None and dtype_name(xp, native) is not None:
            # (an array read from a file of another machine's byte order)
            raise TypeError(f"{name} has dtype {x.dtype}: {native} in the byte order of another machine, which the "
                            f"kernels do not take; convert it with {name}.astype({name}.dtype.newbyteorder('='))")
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected one of {', '.join(FLOAT_DTYPE_NAMES)}"
        )
    return found


def _native_byte_order(dtype):
    """A NumPy dtype of non-native byte order (``>f8`` on a little-endian
    machine) in the machine's own; None for any other dtype."""
    if getattr(dtype, "byteorder", "=") in ("=", "|") or not hasattr(dtype, "newbyteorder"):
        return None
    return dtype.newbyteorder("=")


def check_real_gradient(xp, W, name, x):
    """A real (orthogonal) W takes a real gradient ``x`` (named ``name``)."""
    if is_complex(xp, x.dtype) and not is_complex(xp, W.dtype):
        raise TypeError(f"{name} has complex dtype {x.dtype} but W is real ({W.dtype}); a real (orthogonal) W "
                        "takes a real gradient")


def check_matrix(name, x, *, square=False):
    """x must have shape (..., m, n), square when asked."""
    shape = tuple(x.shape)
    if len(shape) < 2:
        raise ValueError(f"{name} must have shape (..., m, n), got shape {shape}")
    if square and shape[-1] != shape[-2]:
        raise ValueError(f"{name} must be square, shape (..., n, n), got shape {shape}")
    if min(shape[-2:]) < 1:
        raise ValueError(f"{name} must not be empty, got shape {shape}")


def check_batch_compatible(**arrays):
    """The leading (batch) axes of the named arrays must broadcast together;
    returns the broadcast batch shape."""
    if all(x.ndim == 2 for x in arrays.values()):  # single matrices, the common case
        return ()
    try:
        return broadcast_shapes(*(tuple(x.shape[:-2]) for x in arrays.values()))
    except ValueError:
        pretty = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
        raise ValueError(f"batch axes (all but the last two) do not broadcast: {pretty}") from None


def check_factor_pair(a_name, a, b_name, b, n, n_from, *, b_rows=None):
    """a (..., n, k) and b (..., b_rows, k) (b_rows = n unless given) with the
    same k >= 0 (k = 0: the product is zero, see :func:`nonempty_factors`); n
    and b_rows come from argument n_from."""
    for name, x, rows in ((a_name, a, n), (b_name, b, n if b_rows is None else b_rows)):
        if len(x.shape) < 2:
            raise ValueError(f"{name} must have shape (..., {rows}, k), got shape {tuple(x.shape)}")
        if x.shape[-2] != rows:
            raise ValueError(
                f"{name} must have shape (..., {rows}, k) to match {n_from}, "
                f"got shape {tuple(x.shape)}"
            )
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same number of columns k, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def nonempty_factors(xp, a, b):
    """Factors (a, b) of ``a @ b^H`` with at least one column: a pair with
    none (an empty batch of a linear layer's ``delta x^H``) is the zero
    product, given as one zero column each, the zero gradient every step
    takes as it is."""
    if a.shape[-1] != 0:
        return a, b
    return tuple(xp.zeros((*x.shape[:-1], 1), dtype=x.dtype, device=device(x)) for x in (a, b))


def unitary_and_factors(W, a, b, *, check_values=True, b_side="rows"):
    """The checks of the kernels f(W, a, b): W (..., n, m), a (..., n, k) and b
    (..., n, k) (``b_side="rows"``, a generator acting from the left) or
    (..., m, k) (``b_side="columns"``, the update a b^H of W); finite a and b
    (``check_values=False``: the kernel checks them for free on its small Gram
    matrices). Returns (xp, W, a, b), the arrays promoted to one dtype."""
    xp = namespace_of(W=W, a=a, b=b)
    for name, x in (("W", W), ("a", a), ("b", b)):
        check_float_dtype(xp, name, x)
    check_matrix("W", W)
    check_factor_pair("a", a, "b", b, W.shape[-2], f"W of shape {tuple(W.shape)}",
                      b_rows=W.shape[-1] if b_side == "columns" else None)
    check_batch_compatible(W=W, a=a, b=b)
    if check_values:
        check_finite(xp, "a", a)
        check_finite(xp, "b", b)
    a, b = nonempty_factors(xp, a, b)
    dtype = xp.result_type(W, a, b)
    return (xp, *(xp.astype(untracked(x), dtype, copy=False) for x in (W, a, b)))


def report_nonfinite(xp, name, x, *, source=None):
    """Raise ValueError describing the NaN/Inf entries of x (the error path only)."""
    bad = ~xp.isfinite(x)
    count = int(xp.sum(xp.astype(bad, xp.int32)))
    if count == 0 and source:
        largest = float(xp.max(xp.abs(x)))
        raise ValueError(
            f"{name} is too large for its dtype: {source} overflows (largest |entry| {largest:.3g} in an "
            f"array of shape {tuple(x.shape)}); scale the gradient (or the loss) down"
        )
    where = f" (detected in {source})" if source else ""
    raise ValueError(
        f"{name} contains NaN or Inf{where}: {count} non-finite entr"
        f"{'y' if count == 1 else 'ies'} in an array of shape {tuple(x.shape)}"
    )


def check_finite(xp, name, x):
    """x must be free of NaN and Inf; a single reduction over x. Not checked
    in a traced program (a JAX tracer under ``jax.jit``, a tensor under
    ``torch.compile`` or in a CUDA-graph capture), whose values cannot be
    read on the host: there NaN and Inf carry through to the result, as in
    ``jnp.linalg`` and ``torch.linalg``."""
    if is_traced(x):
        return
    if not bool(finite_flag(xp, x)):
        report_nonfinite(xp, name, x)


def refuse_jax_trace(function, arguments, reason, instead):
    """A TypeError naming the first JAX tracer among ``arguments`` (name ->
    value) for a public ``function`` that cannot run under ``jax.jit`` or other
    JAX transformations: ``reason`` says why, ``instead`` what to use. JAX's
    own error there (a tracer converted to a NumPy array or a bool) names
    neither the argument nor the way out.

    Not for ``torch.compile``: an error raised while Dynamo traces reaches
    the caller even without ``fullgraph=True``, where the call should run
    eagerly, outside the graph (``_host.outside_torch_graph`` does that, and
    names the call under ``fullgraph=True``)."""
    for name, value in arguments.items():
        if is_jax_tracer(value):
            raise TypeError(f"{name} is a JAX tracer: {function} does not run under jax.jit or other JAX "
                            f"transformations, because {reason}. {instead}")


@staged()
def finite_flag(xp, x):
    """Whether x is free of NaN and Inf, as a 0-d array (one program on eager
    JAX arrays, see ``_host.staged``)."""
    return xp.all(xp.isfinite(x))


def check_real_scalar(name, value, *, positive=False, traced=False):
    """A finite real number (Python, NumPy or 0-d array scalar), > 0 when
    ``positive``; returns it as a float. With ``traced``, a traced value
    (``jax.jit``, ``vmap`` or ``grad`` over it) is returned as it is once its
    kind is checked (a real 0-d array): its value cannot be read. So is a
    number that ``torch.compile`` made symbolic (from its second value on:
    Dynamo's ``SymFloat``, which has no dtype to look at)."""
    if traced and isinstance(value, (int, float)) and not isinstance(value, bool) and torch_graph_tracing():
        return value  # (Dynamo shows its SymFloat as a float, whose value it cannot give)
    kind = str(getattr(value, "dtype", ""))
    # (a Python number is never traced, and Dynamo cannot trace is_traced's
    # look at its type)
    if traced and not isinstance(value, (int, float)) and is_traced(value):
        if tuple(getattr(value, "shape", ())) != () or "bool" in kind or "complex" in kind:
            raise TypeError(f"{name} must be a real number, got a traced array of shape {tuple(value.shape)} "
                            f"and dtype {kind}")
        return value
    # (a NumPy, PyTorch or JAX bool or complex scalar passed as lr = 1, or
    # without its imaginary part)
    if isinstance(value, (bool, complex)) or "bool" in kind or "complex" in kind or not (
        isinstance(value, numbers.Real) or getattr(value, "shape", None) == ()
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    try:
        number = float(value.detach() if hasattr(value, "detach") else value)  # (a tensor that requires grad)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a real number, got {type(value).__name__}: {value!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def check_int(name, value, *, minimum=None, maximum=None, maximum_reason=""):
    """An integer in [minimum, maximum]; returns it as int. A bool is none,
    nor a 0-d bool array (``operator.index(torch.tensor(True))`` is 1, so
    ``ModReLU(torch.tensor(True))`` built a layer of size 1)."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        raise TypeError(f"{name} must be an integer, got bool: {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}: {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum}{maximum_reason}, got {value!r}")
    return number


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
