"""Array API glue shared by every kernel (floor 1).

Everything here is written against the Python Array API standard; the only
library used by name is ``array_api_compat``, which maps NumPy, CuPy, PyTorch
and JAX onto the standard.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
import warnings

import numpy
from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as _device

__all__ = [
    "Adjoint",
    "RightProduct",
    "dtype_name_of",
    "fuses_right_update",
    "untracked",
    "adjoint_matmul",
    "blocked_normal",
    "matmul_panel",
    "max_abs",
    "times_inverse_cholesky_factor",
    "shifted_diagonal",
    "is_column_major",
    "panel_times_small",
    "row_layout",
    "rows_beyond_cache",
    "array_namespace",
    "broadcast_shapes",
    "complex_dtype",
    "core_dtype",
    "device",
    "device_key",
    "dtype_name",
    "exact_products",
    "eye",
    "is_array_api_obj",
    "is_complex",
    "known_namespace",
    "mH",
    "namespace",
    "real_dtype",
    "supports_float64",
]

FLOAT_DTYPE_NAMES = ("float32", "float64", "complex64", "complex128")

_REAL_OF = {"complex64": "float32", "complex128": "float64"}
_COMPLEX_OF = {"float32": "complex64", "float64": "complex128"}
_WIDE_OF = {"float32": "float64", "complex64": "complex128"}

# (namespace id, device, or its repr where unhashable) -> bool. Asking a
# namespace which dtypes a device supports is cheap but not free; a step asks
# it every time.
_FLOAT64_SUPPORT: dict[tuple[int, object], bool] = {}


# type of an array -> its namespace: array_api_compat decides by the type
# alone, in about ten isinstance tests, and a step asks three times.
_NAMESPACE_OF_TYPE: dict[type, object] = {}


def known_namespace(x):
    """The namespace of x where arrays of x's type were seen before (only
    arrays' types are kept), else None."""
    return _NAMESPACE_OF_TYPE.get(type(x))


def namespace(x):
    """``array_namespace(x)`` for one array, looked up by its type."""
    xp = _NAMESPACE_OF_TYPE.get(type(x))
    if xp is None:
        xp = _NAMESPACE_OF_TYPE[type(x)] = _first_namespace(x)
    return xp


def _first_namespace(x):
    """``array_namespace(x)``; for a JAX array with the library's own
    transfers allowed: the compat layer makes a JAX array (``jnp.empty(0)``)
    to ask for the namespace, a transfer that a caller's
    ``jax.transfer_guard("disallow")`` would refuse."""
    if type(x).__module__.partition(".")[0] in ("jax", "jaxlib"):
        with jax_transfers_allowed():
            return array_namespace(x)
    return array_namespace(x)


def jax_transfers_allowed():
    """The context that lets the library's own host-to-device transfers
    through a caller's JAX transfer guard (``_host.own_transfers``)."""
    return sys.modules["jax"].transfer_guard_host_to_device("allow")


def dtype_name(xp, dtype) -> str | None:
    """Name of a supported floating dtype of ``xp`` (``"float32"`` ...), or None."""
    for name in FLOAT_DTYPE_NAMES:
        if dtype == getattr(xp, name):
            return name
    return None


def is_complex(xp, dtype) -> bool:
    # PyTorch's dtypes say it themselves, and NumPy's (JAX's and CuPy's are
    # NumPy's) by their kind, without the compat layer's isdtype (2 us, and a
    # step asks some thirty times)
    flag = getattr(dtype, "is_complex", None)
    if isinstance(flag, bool):
        return flag
    kind = getattr(dtype, "kind", None)
    if isinstance(kind, str):
        return kind == "c"
    return xp.isdtype(dtype, "complex floating")


def real_dtype(xp, dtype):
    """float32 for complex64, float64 for complex128, the dtype itself if real."""
    name = dtype_name(xp, dtype)
    return getattr(xp, _REAL_OF.get(name, name))


def complex_dtype(xp, dtype):
    """complex64 for float32, complex128 for float64, the dtype itself if complex."""
    name = dtype_name(xp, dtype)
    return getattr(xp, _COMPLEX_OF.get(name, name))


def device_key(dev):
    """``dev`` as a dict key: itself, or its repr where it cannot be hashed
    (CuPy's ``cupy.cuda.Device`` compares by id but has no hash)."""
    try:
        hash(dev)
    except TypeError:
        return repr(dev)
    return dev


def supports_float64(xp, dev) -> bool:
    """Whether arrays of dtype float64 can live on device ``dev`` of ``xp``.

    False for array_api_strict's ``no_float64`` device and for JAX without x64
    (whose setting may change while a program runs: it is part of the key).
    """
    key = (id(xp), device_key(dev), _is_jax(xp) and bool(sys.modules["jax"].config.jax_enable_x64))
    cached = _FLOAT64_SUPPORT.get(key)
    if cached is None:
        try:
            names = xp.__array_namespace_info__().dtypes(device=dev, kind="real floating")
            cached = "float64" in names
        except Exception:  # a namespace without a usable inspection API: just try
            try:
                probe = xp.zeros((1,), dtype=xp.float64, device=dev)
                cached = probe.dtype == xp.float64
            except Exception:
                cached = False
        _FLOAT64_SUPPORT[key] = cached
    return cached


# (namespace id, dtype) -> (eps, smallest normal) of the real dtype of that
# precision: a step asks about six times, the namespace's finfo costs a call.
_REAL_FINFO: dict[tuple[int, object], tuple[float, float]] = {}


def real_finfo(xp, dtype):
    """(eps, smallest_normal) as Python floats of the real dtype of the
    precision of ``dtype`` (float32 for complex64)."""
    key = (id(xp), dtype)
    cached = _REAL_FINFO.get(key)
    if cached is None:
        info = xp.finfo(real_dtype(xp, dtype))
        cached = _REAL_FINFO[key] = (float(info.eps), float(info.smallest_normal))
    return cached


def core_dtype(xp, dtype, dev):
    """The dtype for the small (r x r) cores: the 64-bit dtype of the same kind
    where the device has it, else ``dtype`` itself."""
    if not supports_float64(xp, dev):
        return dtype
    name = dtype_name(xp, dtype)
    return getattr(xp, _WIDE_OF.get(name, name))


def mT(xp, x):
    """Transpose of the last two axes, a view: the array's own ``mT`` (an
    attribute of the standard's arrays; a tenth of the compat layer's
    ``matrix_transpose``, and a step transposes some twenty times), or
    ``matrix_transpose`` where an array has none (NumPy before 2.0)."""
    try:
        return x.mT
    except AttributeError:
        return xp.matrix_transpose(x)


def mH(xp, x):
    """Conjugate transpose of the last two axes (a view where the backend allows;
    no conjugation pass for real input)."""
    xt = mT(xp, x)
    return xp.conj(xt) if is_complex(xp, x.dtype) else xt


def untracked(x):
    """x without autograd history (a torch ``nn.Parameter``, a tensor that
    requires grad, or a forward-mode dual tensor: its ``detach()``, a view);
    other arrays as they are. A step's result is new values for W, not a
    function of W to differentiate, and a tracked result would grow the
    autograd graph step after step. (A dual W's tangent went through the
    kernels' device products but not through their small factorizations on
    the host: a tangent of ``exp_transport`` came back 1.5 off, without a
    word.)"""
    if getattr(x, "requires_grad", False) or _is_dual(x):
        return x.detach()
    return x


def _is_dual(x):
    """Whether x is a PyTorch tensor with a forward-mode tangent (only looked
    for inside a ``dual_level``, where one can be)."""
    torch = sys.modules.get("torch")
    return (torch is not None and torch.autograd.forward_ad._current_level >= 0 and isinstance(x, torch.Tensor)
            and torch.autograd.forward_ad.unpack_dual(x).tangent is not None)


class Adjoint:
    """The conjugate transpose ``M^H`` of a large matrix M (..., n, m), never
    formed: the product helpers below multiply by M itself, in its own
    layout, so a kernel written for tall matrices steps a wide one (or its
    gradient) through ``Adjoint(W)`` with no transposed operand.

    A transposed view is free in PyTorch and NumPy but not in XLA: under
    ``jax.jit`` on the CPU, ``W^T @ P`` copies W into its transpose first
    (1024 x 1024, float32: 3.4-3.6 ms against 0.08-0.14 ms for ``W @ P`` or
    ``P^T @ W``, JAX 0.10), which made the jitted optax step of a 512 x 2048
    W 13x slower than that of its 2048 x 512 transpose.

    Only ``shape``, ``ndim``, ``dtype``, :func:`device` and the product
    helpers (:func:`matmul_panel`, :func:`adjoint_matmul`, :func:`adjoint_rows`)
    accept it; anything else fails loudly on it.
    """

    __slots__ = ("M",)

    def __init__(self, M):
        self.M = M

    @property
    def shape(self):
        return (*self.M.shape[:-2], self.M.shape[-1], self.M.shape[-2])

    @property
    def ndim(self):
        return self.M.ndim

    @property
    def dtype(self):
        return self.M.dtype


def device(x):
    """The device of an array (or of an :class:`Adjoint`'s matrix); a PyTorch
    tensor's own ``device`` (a tenth of the compat layer's call, which a step
    makes some ten times)."""
    if isinstance(x, Adjoint):
        x = x.M
    if type(x).__module__.startswith("torch"):
        return x.device
    return _device(x)


def adjoint_matmul(xp, A, B):
    """``A^H @ B`` for a large A and a thin B, without a conjugated copy of A:
    ``(B^H A)^H`` conjugates only the thin B and the thin result.

    PyTorch conjugates lazily, but its matmul reads a conjugated large operand
    in place only where BLAS's conjugate-transpose mode fits the layout:
    ``A.mH @ B`` with a row-major A first writes a conjugated copy of A
    (complex64, 2048 x 2048, one CPU thread: 18-20 ms against 1.7-4.4 ms for
    one or two columns). The one case it reads A in place and runs faster is
    a column-major A times one column (3.3 against 12.6 ms).
    """
    if isinstance(A, Adjoint):  # (M^H)^H B
        return matmul_panel(xp, A.M, B)
    if _lazy_conjugation(xp):
        # PyTorch: the forms below written out (a step makes three of these
        # products; the generic helpers cost about 2 us of Python each)
        if not A.is_complex():
            # a column-major A is the transpose R^T of a row-major R: A^T B = R B
            return A.mT @ B if _torch_cpu_direct(A, B) and is_column_major(A) else (B.mT @ A).mT
        if is_column_major(A) and B.shape[-1] == 1:
            return A.mH @ B
        return (B.mH @ A).mH.resolve_conj()
    return mH(xp, _as_computed(xp, adjoint_rows(xp, B, A)))


def _as_computed(xp, X):
    """The thin X kept as computed, where a compiler would fold the transpose
    that follows it into the product that made it. XLA's CPU backend rewrites
    ``(B^H A)^H`` for a thin B of two or more columns into a product that
    transposes the large A first (1024 x 1024 float32: 3.6 ms against 0.14 ms
    for two columns, 0.23 ms for eight; JAX 0.10, one thread), which made
    every jitted step of rank 2 or more ten times slower than rank 1; and
    ``(A P)^H`` into ``P^H A^H``, which runs at half speed (0.27 against
    0.13 ms, 0.45 against 0.20 ms). A JAX ``optimization_barrier`` (an
    identity) keeps the product and its small transpose apart; other
    libraries do not rewrite products, and a panel of one row or column is
    its own transpose. (The barrier batches under ``jax.vmap`` from JAX
    0.4.38, the minimum this package asks for.) Not for a batch of panels
    of fewer than four columns: there XLA's CPU compiler aborted the process
    (JAX 0.10.2, "Check failed: ... IsMonotonicWithDim0Major" in
    dot_op_emitter.cc) on the transpose after the barrier (real panels of two
    or three columns, as ``Y^H G`` of a batch of n x 3 matrices at rank 2;
    four to 64 columns, and complex ones, compiled), and a large operand of
    three columns costs little to transpose."""
    if min(X.shape[-2:]) > 1 and (X.ndim == 2 or X.shape[-1] >= 4) and _is_jax(xp):
        return sys.modules["jax"].lax.optimization_barrier(X)
    return X


def adjoint_rows(xp, P, A):
    """``P^H @ A`` for a thin P (..., n, r): the conjugation costs no
    operation of its own on PyTorch, whose matmul reads a conjugated thin
    operand (a conjugate bit) as it multiplies; elsewhere P is conjugated
    (O(n r)) first. Also the Gram ``P^H P``. Where the library's CPU product
    of a few rows is measured slower than one product per row
    (:func:`by_columns`), it is made row by row."""
    if isinstance(A, Adjoint):  # P^H M^H = (M P)^H
        return mH(xp, _as_computed(xp, matmul_panel(xp, A.M, P)))
    if _lazy_conjugation(xp):  # PyTorch: never by columns, and P^H is a flag (its mT for real P)
        return P.mH @ A
    if by_columns(xp, A, P, "left"):
        return xp.concat([mH(xp, P[..., j:j + 1]) @ A for j in range(P.shape[-1])], axis=-2)
    return mH(xp, _as_computed(xp, P)) @ A


# PyTorch's CPU product of a row-major matrix R and a real panel P of many
# columns runs at one pass over R as it is written, ``R @ P``, where the
# transposed form ``(P^T R^T)^T`` that :func:`matmul_panel` takes for a few
# columns reads R about once per two columns (float32, one thread, 1024 x
# 1024: 0.30 against 0.44 ms for 8 columns, 0.30 against 0.59 ms for 11;
# float64: 0.50 against 0.64 ms for 4 columns, 0.66 against 0.84 ms for 11;
# 2048 x 2048 and batches of 512 x 512 alike; Intel Xeon, torch 2.13,
# 2026-12-06). ``R^T @ P`` is the other way round: as ``(P^T R)^T`` it
# stays faster up to 16 columns and ties at 32. So the plain form from this
# many bytes of a panel's row on (8 float32 or 4 float64 columns); complex
# panels keep the transposed forms, which tie or win at every width
# measured (complex64 and complex128, 2 to 32 columns).
_TORCH_CPU_DIRECT_ROW_BYTES = 32


def _torch_cpu_direct(A, P):
    """Whether PyTorch's CPU product of the large real A and the panel P
    is made as written (see :data:`_TORCH_CPU_DIRECT_ROW_BYTES`)."""
    return P.shape[-1] * P.element_size() >= _TORCH_CPU_DIRECT_ROW_BYTES and A.is_cpu and not A.is_complex()


def matmul_panel(xp, A, P):
    """``A @ P`` for a large A (..., n, n) and a thin panel P (..., n, r).

    PyTorch's CPU matmul runs a column-major A times an n x 2 panel 50x slower
    than it should; as ``(P^T A^T)^T``, a thin row panel times a matrix, it
    runs at memory speed whatever A's layout, and the result comes out column
    by column, the layout the next product wants. (P itself should be stored
    column by column, as the kernels' panels are: from a row-major P the same
    product took 3x as long; 1024 x 1024, float32, two columns, one thread:
    0.32 against 0.10 ms.) A real panel of many columns is the exception:
    there the plain product of a row-major A is the faster one on the CPU
    (:data:`_TORCH_CPU_DIRECT_ROW_BYTES`). NumPy's BLAS takes either layout through its
    transpose flags, and XLA would copy A to transpose it, so elsewhere the
    product is written as it is; where the library's CPU product of a panel
    of a few columns is measured slower than one matrix-vector product per
    column (:func:`by_columns`: NumPy's OpenBLAS, XLA in float64), it is made
    column by column.
    """
    if isinstance(A, Adjoint):  # M^H P
        return adjoint_matmul(xp, A.M, P)
    if _is_torch(xp):  # one column runs at memory speed either way
        if P.shape[-1] == 1 or (_torch_cpu_direct(A, P) and not is_column_major(A)):
            return A @ P
        return mT(xp, mT(xp, P) @ mT(xp, A))
    if by_columns(xp, A, P, "right"):
        if rows_beyond_cache(A, P):
            return _blocked_columns(A, P)
        return xp.concat([A @ P[..., j:j + 1] for j in range(P.shape[-1])], axis=-1)
    return A @ P


# Thin products that the library's CPU BLAS runs slower as one product of a
# panel than as one matrix-vector product per column of the panel, by library
# and side ("right": A @ P, "left": P^H @ A): dtype -> the panel widths
# measured to gain, on row-major 2-D matrices (NumPy: any). One thread, AMD
# EPYC (docs/benchmarks.md, "NumPy's thin products" and "XLA's thin products on
# the CPU, one column at a time"):
# - NumPy's OpenBLAS pads a panel of two or three columns to its kernel's width
#   and runs it as slowly as eight (float64: 20.5 ms at n = 4096 against 5.5 ms
#   for one column and 11.3 ms for two columns one by one; 0.83 against 0.17
#   and 0.32 ms at n = 1024); two rows: 0.37 against 0.89 ms at n = 1024
#   (three rows gain at n = 1024 but lose a fifth at n = 4096);
# - XLA's CPU dot (JAX 0.10): float64 times two columns 0.42 against 0.16 ms
#   at n = 1024 (7.1 against 7.7 ms at n = 4096; three columns lose half at
#   n = 4096); float64 and complex panels of two to four rows, 0.35 against
#   0.16 ms (float64, two rows, n = 1024), 50 against 20 ms (complex128,
#   n = 4096); float32 runs at memory speed either way.
_ANY = ("float32", "float64", "complex64", "complex128")
_BY_COLUMNS = {
    ("numpy", "right"): dict.fromkeys(_ANY, (2, 3)),
    ("numpy", "left"): dict.fromkeys(_ANY, (2,)),
    ("jax", "right"): {"float64": (2,)},
    ("jax", "left"): dict.fromkeys(("float64", "complex64", "complex128"), (2, 3, 4)),
}
# Eagerly, each of JAX's slices is a dispatch of its own (about 30 us on the
# CPU, JAX 0.10.2), so a split product pays only on a large A (1024 x 1024
# float64, two rows: 0.35 against 0.16 ms plus some 0.1 ms of dispatches; at
# 64 x 64 the split made a rank-3 step 0.4 ms slower); under jax.jit slices
# cost nothing and the table holds at every size.
_EAGER_SPLIT_ENTRIES = 1 << 19
_WIDEST_BY_COLUMNS = max(max(w) for rule in _BY_COLUMNS.values() for w in rule.values())


def by_columns(xp, A, P, side):
    """Whether the thin product of the large A and the panel P (``A @ P`` for
    side "right", ``P^H @ A`` for "left") runs faster as one product per
    column of P on this library and device (see ``_BY_COLUMNS``): on the CPU
    only (a GPU pays a launch per product), for a large A (not a Gram)."""
    if not 2 <= P.shape[-1] <= _WIDEST_BY_COLUMNS:
        return False
    name = getattr(xp, "__name__", "")
    if name in _NUMPY_NAMES:
        library = "numpy"
    elif name.startswith("jax") and A.ndim == 2 and _jax_on_cpu(A) and \
            (isinstance(A, sys.modules["jax"].core.Tracer) or math.prod(A.shape) >= _EAGER_SPLIT_ENTRIES):
        library = "jax"
    else:
        return False
    widths = _BY_COLUMNS.get((library, side), {}).get(dtype_name(xp, P.dtype), ())
    return P.shape[-1] in widths and A.shape[-1] > P.shape[-1] + 1


def _jax_on_cpu(x):
    """Whether the JAX array x lives on a CPU; a traced one (under jax.jit)
    has no device yet and is taken to run on the default backend."""
    jax = sys.modules["jax"]
    if isinstance(x, jax.core.Tracer):
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in x.devices())


def add_product(xp, W, L, Rh):
    """``W + L @ Rh`` as a new array, for a large W (..., n, m), a thin L
    (..., n, r) and a thin Rh (..., r, m); the result has W's layout.

    PyTorch's CPU matmul of an n x r by an r x m operand into a fresh array
    costs 2-3x its ``addmm`` (4096 x 256, float32, r = 2: 0.80 ms against
    0.23 ms for ``addmm(W, L, Rh)``; 4096 x 4096: 87 ms against 44 ms for
    ``W + L @ Rh``), and ``addmm`` writes W + L Rh in one pass; it is
    differentiable and traceable. Elsewhere the product is written once and
    W added into it in place (JAX makes a new array, which XLA fuses under jit);
    on NumPy arrays beyond the last-level cache, block by block of rows
    (:func:`_blocked_update`).
    """
    if _is_torch(xp) and W.ndim == L.ndim == Rh.ndim and L.dtype == Rh.dtype == W.dtype and \
            (W.ndim == 2 or (W.ndim == 3 and L.shape[:-2] == Rh.shape[:-2] == W.shape[:-2])):
        torch = sys.modules["torch"]  # loaded: W is one of its tensors
        L, Rh = update_factors(xp, W, L, Rh)
        fused = torch.addmm if W.ndim == 2 else torch.baddbmm
        transposed = is_column_major(W)
        if transposed:  # the transposed sum, written in W's layout
            W, L, Rh = mT(xp, W), mT(xp, Rh), mT(xp, L)
        out = _huge_page_result(torch, W, L, Rh)
        rows = update_chunk_rows(W, L.shape[-1])
        if rows:
            result = _chunked_update(torch, W, L, Rh, rows, out)
        else:
            result = fused(W, L, Rh) if out is None else fused(W, L, Rh, out=out)
        return mT(xp, result) if transposed else result
    if isinstance(W, numpy.ndarray) and W.nbytes >= _BEYOND_CACHE_BYTES and L.dtype == Rh.dtype == W.dtype:
        return _blocked_update(W, L, Rh)
    if isinstance(L, RightProduct):  # not the case it was made for: formed as it is meant
        L = L.formed()
    if is_column_major(W):
        out = mT(xp, mT(xp, Rh) @ mT(xp, L))
    else:
        out = lowrank_product(xp, L, Rh)
    out += W
    return out


# NumPy's ``W + L @ Rh`` of a W larger than the last-level cache writes the
# product L Rh to memory and reads it back for the sum: four passes over n x m
# data where two would do. Block by block of rows, into the result, the
# product stays in the cache. One thread, OpenBLAS, rank 2, the CPU's 32 MiB
# L3: float32 4096 x 4096 11.5 -> 7.5 ms, float64 22.7 -> 15.8 ms, complex128
# 2048 x 2048 12.8 -> 9.8 ms, 4096 x 4096 52.7 -> 35.5 ms; at 16 MiB and below
# within 10 % either way (blocks of 64 KiB lose up to 40 % there). The same
# size decides for the thin products (``_blocked_columns``).
_BEYOND_CACHE_BYTES = 16 * 2**20
_UPDATE_BLOCK_BYTES = 2**20


# NumPy's products of a row-major A beyond the last-level cache with two or
# three columns, one matrix-vector product per column (``by_columns``), read
# A once per column from memory. Block by block of rows (about 512 KiB,
# which stays in the core's cache for the next column), A is read from memory
# once. One thread, two columns: float32 4096 x 4096 3.70 -> 2.76 ms, float64
# 7.73 -> 5.94 ms, complex128 2048 x 2048 5.33 -> 3.60 ms, 4096 x 4096 21.6 ->
# 13.1 ms; three columns gain more. At 16 MiB and below within 10 % either way.
_PRODUCT_BLOCK_BYTES = 2**19


def rows_beyond_cache(A, P):
    """Whether the NumPy products of A with the thin panel P are made block
    by block of A's rows (``_blocked_columns``, :func:`blocked_normal`): a
    2-D row-major NumPy A of more than ``_BEYOND_CACHE_BYTES``, a 2-D NumPy
    P. (At exactly 16 MiB, float32 2048 x 2048, A still fits the 32 MiB
    cache, and the pair of products in blocks took 0.54 against 0.50 ms.)"""
    return isinstance(A, numpy.ndarray) and A.ndim == 2 and A.nbytes > _BEYOND_CACHE_BYTES and \
        A.flags.c_contiguous and isinstance(P, numpy.ndarray) and P.ndim == 2


# The power iteration's pairs of products ``Y = A X``, then ``A^H Y``, on a
# NumPy A beyond the last-level cache read A from memory twice. Block by
# block of rows (about 2 MiB, which stays in the last-level cache for the
# second product) A is read from memory once. One thread, one column, both
# products, medians of three runs: 4096 x 4096 float32 4.8 -> 3.4 ms, float64
# 8.7 -> 6.7 ms, complex128 21.8 -> 15.5 ms; 2048 x 2048 float64 1.86 -> 1.65
# ms, complex128 5.1 -> 4.1 ms.
_NORMAL_BLOCK_BYTES = 2**21


def blocked_normal(A, X, divisor=None):
    """``(Y, Z, s)`` with ``Y = A X / s`` and ``Z = A^H Y`` for a 2-D
    row-major NumPy A and a NumPy panel X (n x l, m x l), block by block of
    A's rows (see :func:`rows_beyond_cache`): ``Z = sum_b A_b^H Y_b`` is
    summed as each block's ``Y_b`` is made, while the block is in the cache.

    ``s`` is ``divisor`` where given, else the largest |entry| of ``A X``
    plus the smallest normal number, as a (1, 1) array: Y's entries are then
    at most 1 and Z about A's size, whatever A's scale. Without a divisor the
    sum runs with the largest |entry| seen so far and is rescaled when a
    later block has a larger one, so that no term overflows before s is
    known. NaN or Inf in A gives NaN or Inf in Y or Z."""
    n, m = A.shape
    dtype = numpy.result_type(A, X)
    tiny = float(numpy.finfo(dtype).smallest_normal)
    Y = numpy.empty((n, X.shape[-1]), dtype=dtype, order="F")
    Zh = numpy.zeros((X.shape[-1], m), dtype=dtype)  # Z^H, summed as rows
    rows = max(8, _NORMAL_BLOCK_BYTES // max(1, A.strides[0]))
    top = 0.0  # the largest |entry| of A X so far, without a divisor
    for start in range(0, n, rows):
        block, Yb = A[start:start + rows], Y[start:start + rows]
        numpy.matmul(block, X, out=Yb)
        if divisor is None:
            block_top = float(numpy.abs(Yb).max())
            if block_top > top:
                Zh *= (top + tiny) / (block_top + tiny)
                top = block_top
            Zh += numpy.conj(Yb / (top + tiny)).T @ block
        else:
            Yb /= divisor
            Zh += numpy.conj(Yb).T @ block
    if divisor is None:
        divisor = numpy.full((1, 1), top + tiny, dtype=numpy.finfo(dtype).dtype)
        Y /= divisor
    return Y, numpy.conj(Zh).T, divisor


def _blocked_columns(A, P):
    """``A @ P`` for a 2-D row-major NumPy A and a panel P of a few columns:
    one matrix-vector product per column and block of rows, the result
    column by column."""
    n = A.shape[0]
    out = numpy.empty((n, P.shape[-1]), dtype=numpy.result_type(A, P), order="F")
    columns = _columns_of(P)
    rows = max(8, _PRODUCT_BLOCK_BYTES // max(1, A.strides[0]))
    for start in range(0, n, rows):
        _rows_times_columns(A[start:start + rows], columns, out[start:start + rows])
    return out


def _columns_of(P):
    """The columns of the panel P, each contiguous (the vectors of the
    matrix-vector products below)."""
    return [numpy.ascontiguousarray(P[:, j]) for j in range(P.shape[-1])]


def _rows_times_columns(rows_of_A, columns, out):
    """``rows_of_A @ P`` into ``out`` (column by column), one matrix-vector
    product per column of P (:func:`_columns_of`): the form of the blocked
    products, whose rows are those of the whole product."""
    for j, column in enumerate(columns):
        numpy.matmul(rows_of_A, column, out=out[:, j])


def _blocked_update(W, L, Rh):
    """``W + L @ Rh`` for NumPy arrays of one dtype, as a new array in W's
    layout, written block by block of rows of about ``_UPDATE_BLOCK_BYTES``
    (of all the batch's matrices together). L may be a :class:`RightProduct`
    of this W, formed here block by block (see there)."""
    if isinstance(L, RightProduct):
        return _fused_update(W, L, Rh)
    if is_column_major(W):  # the transposed sum, row by row of W^T
        return mT(numpy, _blocked_update(mT(numpy, W), mT(numpy, Rh), mT(numpy, L)))
    out = numpy.empty(W.shape, dtype=W.dtype)
    n = W.shape[-2]
    rows = max(1, _UPDATE_BLOCK_BYTES // max(1, W.nbytes // n))
    for start in range(0, n, rows):
        block = out[..., start:start + rows, :]
        numpy.matmul(L[..., start:start + rows, :], Rh, out=block)
        block += W[..., start:start + rows, :]
    return out


# A right update ``W + (W Q) D Q^H`` of a NumPy W beyond the last-level cache
# reads W twice from memory: once for the panel W Q, once for the sum. Block
# by block of rows (512 KiB, which stay in the core's cache from the panel's
# products to the sum) W is read once, and each block's rows of W Q are those
# of the whole product (one matrix-vector product per column, as
# ``_blocked_columns`` makes them). One thread, float64 4096 x 4096, rank 2:
# 81-86 ms for the panel and the update, 69-72 ms fused in blocks of 256 KiB
# (1 MiB: 73-75, 4 MiB: 86-91; the update alone 66-78 ms). The whole T-step,
# block sizes alternated in one process, three runs: 512 KiB 98-106 ms,
# 128 KiB 104-113, 256 KiB 102-111, 1 MiB 107-114; float32 4096 x 4096 and
# complex128 2048 x 2048 likewise 512 KiB (48.6 against 50.8 ms, 55.8 against
# 58.4 ms with 256 KiB).
_FUSED_BLOCK_BYTES = 2**19


class RightProduct:
    """The panel ``L = (W @ Q) @ D`` of a right update ``W + L @ Q^H``, not
    formed: :func:`add_product` forms its rows block by block as it adds
    them to W (``_fused_update``), one read of W where forming L first makes
    two. For a 2-D row-major NumPy W beyond the last-level cache, Q (n, r)
    and D (r, r) NumPy arrays of W's dtype; ``formed()`` is the panel itself.
    Made only where the caller applies the update at once
    (``_flow.fused_right_update``)."""

    __slots__ = ("D", "Q", "W")

    def __init__(self, W, Q, D):
        self.W, self.Q, self.D = W, Q, D

    @property
    def dtype(self):
        return self.W.dtype

    def formed(self):
        return matmul_panel(numpy, self.W, self.Q) @ self.D


def fuses_right_update(W) -> bool:
    """Whether the right update of W is applied fused with its panel's
    products (:class:`RightProduct`): a 2-D square row-major NumPy W of
    ``_BEYOND_CACHE_BYTES`` or more, the arrays :func:`add_product` updates
    block by block."""
    return isinstance(W, numpy.ndarray) and W.ndim == 2 and W.shape[0] == W.shape[1] and W.flags.c_contiguous \
        and W.nbytes >= _BEYOND_CACHE_BYTES


def _fused_update(W, L, Rh):
    """``W + L @ Rh`` for the :class:`RightProduct` L of this W: per block of
    rows, its rows of ``W Q`` (one matrix-vector product per column), times
    D, times Rh, plus W's rows, while the block is in the cache."""
    out = numpy.empty(W.shape, dtype=W.dtype)
    columns = _columns_of(L.Q)
    n = W.shape[0]
    rows = max(8, _FUSED_BLOCK_BYTES // max(1, W.strides[0]))
    panel = numpy.empty((min(rows, n), len(columns)), dtype=W.dtype, order="F")
    for start in range(0, n, rows):
        block, rows_of_W = out[start:start + rows], W[start:start + rows]
        part = panel[:rows_of_W.shape[0]]
        _rows_times_columns(rows_of_W, columns, part)
        numpy.matmul(part @ L.D, Rh, out=block)
        block += rows_of_W
    return out


# Under jax.jit on the CPU, XLA fuses a sum that follows a product into the
# product's output, and runs ``W + L @ Rh`` of rank 2 at a quarter of memory
# speed (JAX 0.10.2, one thread, 1024 x 1024 float32: 0.38 ms, against 0.10 ms
# for the sum of r broadcast products ``L[:, j:j+1] * Rh[j:j+1, :]``, which it
# fuses with the sum into one elementwise pass; complex64: 0.89 against
# 0.23 ms; complex128: 1.91 against 1.15 ms). The product alone gains too
# (complex64, rank 2: 0.69 against 0.18 ms) or stays within 10 %. Wider
# panels lose: float32 from rank 6 on, float64 from rank 4 on (W + L Rh of
# rank 8: 0.57 against 0.39 ms). dtype -> the highest rank written so.
_BROADCAST_RANKS = {"float32": 4, "float64": 3, "complex64": 8, "complex128": 8}


def lowrank_product(xp, L, Rh):
    """``L @ Rh`` for thin L (..., n, r) and Rh (..., r, m): in a program that
    JAX traces for the CPU, of a rank in ``_BROADCAST_RANKS``, as the sum of
    r broadcast products (one elementwise pass, with a sum into W that
    follows it); elsewhere one product (eagerly, each broadcast product
    would be an n x m array of its own)."""
    r = L.shape[-1]
    if 2 <= r <= _BROADCAST_RANKS.get(dtype_name(xp, L.dtype), 0) and _is_jax(xp) and \
            any(isinstance(x, sys.modules["jax"].core.Tracer) for x in (L, Rh)) and _jax_on_cpu(L):
        out = L[..., :, 0:1] * Rh[..., 0:1, :]
        for j in range(1, r):
            out = out + L[..., :, j:j + 1] * Rh[..., j:j + 1, :]
        return out
    return L @ Rh


# PyTorch's CPU rank-r update (MKL's sgemm and zgemm, torch 2.13, x86-64) is
# slow when the rows of W lie a multiple of 2 KiB apart (a row of 512, 1024 or
# 4096 float32 entries; of 128 or more complex128 ones, a power of two): one
# thread, in place, rank 2, float32 at 1024 x 1024 took 0.63-0.83 ms, against
# 0.08 ms at 1000 x 1000 and 0.09-0.14 ms for the same update as a batch of
# 8-row blocks (one ``baddbmm``); 4096 x 4096: 10.9 against 3.4 ms; 512 x 512:
# 104-110 against 24-26 us; complex128 at 1024 x 1024: 2.2 against 0.45 ms.
# Ranks 5-8 in float32 gain only where the rows are a multiple of 4 KiB apart
# (1024 x 1024, rank 8: 0.60 against 0.21 ms; 512 x 512: 41 against 49 us).
# float64 and complex64 run at memory speed either way, and so does rank 1 (a
# ger) or above 8, and complex128 above rank 4, where blocks lose up to a
# fifth. Two threads: the same ratios. NumPy's OpenBLAS shows none of it.
# (dtype -> (lowest rank, highest rank, row bytes a multiple of), ...);
# measured by docs/scripts/update_forms.py.
_CHUNK_ROWS = 8
_CHUNKED_RANKS = {"float32": ((2, 4, 2048), (5, 8, 4096)), "complex128": ((2, 4, 2048),)}


_DTYPE_NAMES = {}


def dtype_name_of(dtype) -> str:
    """The short name of an array library's dtype object ("float32" for
    ``torch.float32``), remembered: ``str`` of a PyTorch dtype costs about
    1 us, and an eager step asks several times."""
    # keyed by the type too: array_api_strict's dtypes hash as NumPy's, and
    # comparing the two warns (a UserWarning, an error under -W error)
    key = (type(dtype), dtype)
    name = _DTYPE_NAMES.get(key)
    if name is None:
        name = _DTYPE_NAMES[key] = str(dtype).rpartition(".")[2]
    return name


def update_chunk_rows(W, r):
    """Rows per block of the update ``W + L @ Rh`` (rank r) of the 2-D PyTorch
    CPU tensor W where its gemm runs slowly (see ``_CHUNKED_RANKS``): the
    update then runs as one batched product over blocks of rows; 0 where the
    plain ``addmm`` is as fast. W must be stored row by row. 0 in a program
    that PyTorch traces (``torch.compile``, ``torch.export``,
    ``torch.jit.trace``): the choice reads the row count, which a traced
    dynamic batch does not give (``torch.export`` with a dynamic batch of a
    Householder adapter failed on the guard ``rows % 8 != 0``, and a
    ``jit.trace`` made at a multiple of 8 rows failed at any other count)."""
    # is_cpu, where ``device.type`` makes a torch.device first (1.1 against 0.2 us)
    if W.ndim != 2 or not W.is_cpu or W.stride(-1) != 1 or W.shape[1] < 2 or _torch_traced():
        return 0
    if W.shape[0] % _CHUNK_ROWS:
        return 0
    row_bytes = W.stride(0) * W.element_size()
    for low, high, multiple in _CHUNKED_RANKS.get(dtype_name_of(W.dtype), ()):
        if low <= r <= high and row_bytes % multiple == 0:
            return _CHUNK_ROWS
    return 0


def _torch_traced():
    """Whether PyTorch is tracing the caller: Dynamo (``torch.compile``,
    ``torch.export``) or ``torch.jit.trace``."""
    torch = sys.modules["torch"]
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def row_blocks(X, L, Rh, rows):
    """The rank-r update ``X + L @ Rh`` of the 2-D X (..., n, m) as a batch:
    (X, L) split into blocks of ``rows`` rows, Rh broadcast to each block;
    views, no copy (``rows`` divides n)."""
    blocks = X.shape[0] // rows
    return X.unflatten(0, (blocks, rows)), L.unflatten(0, (blocks, rows)), Rh.expand(blocks, *Rh.shape)


def _chunked_update(torch, W, L, Rh, rows, out=None):
    """``W + L @ Rh`` (into ``out`` when given) as one ``baddbmm`` over blocks
    of ``rows`` rows of the row-major 2-D W (:func:`row_blocks`);
    differentiable without ``out``."""
    blocks = row_blocks(W, L, Rh, rows)
    if out is None:
        return torch.baddbmm(*blocks).flatten(0, 1)
    torch.baddbmm(*blocks, out=out.unflatten(0, (W.shape[0] // rows, rows)))
    return out


def add_in_place(W, L, Rh):
    """``W += L @ Rh`` for a 2-D PyTorch tensor W (a parameter an optimizer
    owns): one fused pass, blocked where PyTorch's gemm is slow
    (:func:`update_chunk_rows`), on the real views of a complex W where that
    is faster (:func:`real_view_factors`)."""
    real = real_view_factors(W, L, Rh)
    if real is not None:
        add_in_place(*real)
        return W
    rows = update_chunk_rows(W, L.shape[-1])
    if rows:
        W_blocks, L_blocks, Rh_blocks = row_blocks(W, L, Rh, rows)
        W_blocks.baddbmm_(L_blocks, Rh_blocks)
    else:
        W.addmm_(L, Rh)
    return W


# MKL's complex rank-r update (torch 2.13, one thread) is bound by arithmetic,
# not by memory: complex64 of rank 2 took twice as long as rank 1 (1024 x 1024,
# in place: 0.44 against 0.22 ms), complex128 of rank 1 half memory speed. The
# same update on W's real view (n x 2m real entries, each complex one as its
# real and imaginary parts) is a real update of rank 2r: L's real and
# imaginary parts as 2r columns, and the rows of Rh and of i Rh, viewed as
# real, as 2r rows. In place (the optimizers' update): complex64 rank 2 at
# 1024 x 1024 0.45 against 0.26 ms, 2048 x 2048 2.9 against 1.4 ms; complex128
# rank 1 0.50 against 0.28 ms, rank 2 0.44 (in blocks of rows) against 0.33 ms,
# 4096 x 256 rank 4 0.79 against 0.57 ms (only 2048 x 2048 of rank 2 lost,
# 2.9 against 3.2 ms). complex64 of rank 1 and 4 gained nothing and rank 8
# loses up to a fifth. Into a new array (``add_product``) a functional step
# gained nothing: there the first writes into fresh memory cost more than the
# arithmetic. dtype -> the ranks of the in-place update written so.
_REAL_VIEW_RANKS = {"complex64": (2,), "complex128": (1, 2, 3, 4)}


def real_view_factors(W, L, Rh):
    """(Wr, Lr, Rr): the in-place update ``W += L @ Rh`` of the row-major 2-D
    complex PyTorch CPU tensor W as ``Wr += Lr @ Rr`` on real views (Wr is a view of
    W, n x 2m; Lr n x 2r and Rr 2r x 2m are O(r (n + m)) copies), where
    ``_REAL_VIEW_RANKS`` says it is faster; None elsewhere (other dtypes,
    ranks, layouts and devices, a W with PyTorch's lazy conjugation bit,
    which has no real view, and while torch.compile traces)."""
    if W.ndim != 2 or not W.is_complex() or not W.is_cpu or W.stride(-1) != 1 or \
            L.shape[-1] not in _REAL_VIEW_RANKS.get(dtype_name_of(W.dtype), ()):
        return None
    torch = sys.modules["torch"]
    if torch.compiler.is_compiling() or W.is_conj():  # (Dynamo does not trace is_conj, a bool)
        return None
    (n, m), r = W.shape, L.shape[-1]
    Lr = torch.view_as_real(L.resolve_conj().resolve_neg()).reshape(n, 2 * r)
    Rr = torch.view_as_real(torch.stack([Rh, Rh * 1j], dim=-2).reshape(2 * r, m)).reshape(2 * r, 2 * m)
    return torch.view_as_real(W).view(n, 2 * m), Lr, Rr


# Results of this many bytes or more are written into memory with transparent
# huge pages (see _huge_page_result); NumPy asks for them from the same size.
_HUGE_PAGE_BYTES = 1 << 22


def _huge_page_result(torch, W, L, Rh):
    """An uninitialised row-major tensor of W's shape and dtype for the new
    ``W + L @ Rh``, in memory that NumPy allocated; None where PyTorch's own
    allocation is used.

    PyTorch's CPU allocator gives every array above glibc's mmap threshold
    (32 MB at most) freshly mapped memory, faulted in page by page (4 KiB) as
    it is first written, and asks for transparent huge pages only in a
    process started with ``THP_MEM_ALLOC_ENABLE=1``; NumPy asks for them
    (madvise) for every array of 4 MiB or more. One thread, torch 2.13: the
    rank-2 ``addmm`` into a fresh 4096 x 4096 array took 108 ms (float64) and
    58 ms (float32) in PyTorch's memory, 36 and 27 ms in NumPy's; 2048 x 2048
    float64: 27 against 9.6 ms. That made a functional torch step at n = 4096
    half page faults. Used only where nothing else can tell: CPU tensors of
    the four float dtypes, no autograd (``out=`` is not differentiable), not
    while torch.compile traces. The result is an ordinary tensor whose
    storage belongs to a NumPy array (it cannot be resized in place)."""
    if not W.is_cpu or W.numel() * W.element_size() < _HUGE_PAGE_BYTES:
        return None
    name = dtype_name_of(W.dtype)
    if name not in ("float32", "float64", "complex64", "complex128") or W.layout != torch.strided:
        return None
    if torch.is_grad_enabled() and (W.requires_grad or L.requires_grad or Rh.requires_grad):
        return None
    if torch.compiler.is_compiling():
        return None
    return torch.from_numpy(numpy.empty(tuple(W.shape), dtype=name))


def update_factors(xp, W, L, Rh):
    """(L, Rh) laid out for the update ``W + L @ Rh`` of a complex PyTorch W:
    the factor along W's contiguous axis (Rh for a row-major W, L for a
    column-major one) copied into W's layout where it is not (O(r (n + m))).
    MKL's complex64 rank-r update is 3-6x slower otherwise (512 x 2048, rank
    2, in place: 3.4-5.8 against 0.9 ms; one CPU thread, torch 2.13), which
    a wide W's factors, the conjugate transposes of a tall step's, hit.
    complex128 and real dtypes are not affected, and other libraries get the
    factors as they are."""
    if not (_is_torch(xp) and is_complex(xp, W.dtype)):
        return L, Rh
    if is_column_major(W):
        if L.shape[-1] > 1 and not is_column_major(L):
            L = mT(xp, mT(xp, L).contiguous())
    elif is_column_major(Rh):
        Rh = Rh.contiguous()
    return L, Rh


def column_layout(xp, P):
    """The thin panel P (..., n, j) stored column by column (a copy of O(n j)
    entries where it is not): on PyTorch, whose autograd writes each operand's
    gradient in the operand's own layout, a row-major panel's gradient comes
    out of products of the slow kind ``panel_times_small`` describes (a
    768 x 64 by 64 x 8 product: 60-85 us against 14 us). Other libraries get
    P as it is."""
    if _is_torch(xp) and P.ndim >= 2 and P.shape[-1] > 1 and not is_column_major(P):
        return mT(xp, mT(xp, P).contiguous())
    return P


def row_layout(xp, X):
    """X stored row by row: a row-major copy where its matrices are stored
    column by column (a LAPACK result such as ``linalg.qr``'s Q, a transposed
    view), X itself otherwise. A new parameter starts in the layout that
    elementwise work (the optimizers' rules, with gradients that autograd
    writes row by row) and every product of a step run fastest in; PyTorch's
    CPU ``addmm`` of a rank-2 update is 3-4x slower into a column-major
    4096 x 256 W than into a row-major one (0.80 against 0.22 ms, float32).
    Flattening copies in row order in every library that has strides; the
    others have no layout to change."""
    if not is_column_major(X):
        return X
    return xp.reshape(xp.reshape(X, (-1,)), X.shape)


def upper_triangular_inverse(xp, A):
    """The inverse of the upper triangular A (..., j, j) from the library's
    triangular solve, or None where the library has none (the standard does
    not): PyTorch's ``solve_triangular`` is one differentiable, traceable op
    with no host sync, where back substitution by products is j - 1 products
    forward and twice as many backward (HTA with 8 reflectors a side: 12 %
    of a 768 x 768 layer's forward + backward)."""
    if not _is_torch(xp):
        return None
    torch = sys.modules["torch"]
    identity = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve_triangular(A, identity, upper=True)


def shifted_diagonal(xp, C, scale, shift):
    """C (..., j, j) with each diagonal entry d replaced by ``d * scale +
    shift``. C must be a fresh array of the caller's (a Gram just formed):
    PyTorch writes it in place, two operations on its diagonal view, where a
    new diagonal and ``diagonal_scatter`` take three (the sketch re-bases
    three panels per step), and so does NumPy (3 us against 20 us for the
    general form); elsewhere ``C + I (d (scale - 1) + shift)``."""
    if _is_torch(xp):
        C.diagonal(dim1=-2, dim2=-1).mul_(scale).add_(shift)
        return C
    if type(C) is numpy.ndarray:  # NumPy: in place too, on a writable view of the diagonal
        d = numpy.einsum("...ii->...i", C)
        d *= scale
        d += shift
        return C
    d = xp.linalg.diagonal(C)
    return C + eye(xp, C.shape[-1], like=C) * (d * (scale - 1) + shift)[..., None, :]


def times_inverse_cholesky_factor(xp, P, M):
    """``P R^-1`` for a panel P (..., n, j) and the Cholesky factor R (upper
    triangular, ``M = R^H R``) of a Hermitian positive definite M (..., j, j),
    laid out column by column (see :func:`panel_times_small`), with no host
    synchronisation. PyTorch's ``cholesky`` reads its error code on the host
    (a synchronisation on a GPU) and ``cholesky_ex`` does not; its triangular
    solve checks nothing and writes the panel column by column, one op for
    ``P R^-1``. The standard has no triangular solve: elsewhere ``P inv(R)``.
    CuPy and JAX check nothing by default; NumPy raises ``LinAlgError``
    where M is not positive definite.

    Dask: array-api-compat (1.16) passes Dask's own ``cholesky`` through,
    which returns the upper factor where the standard's returns the lower
    one, and Dask's is wrong for complex matrices (dask/dask#12335). The
    basis still spanned P, badly conditioned: ``randomized_svd`` of a
    float64 matrix lost seven digits of its third singular value. There the
    small M is factored by NumPy (a Dask graph is computed at every host
    round trip anyway)."""
    if _is_torch(xp):
        linalg = sys.modules["torch"].linalg
        return linalg.solve_triangular(linalg.cholesky_ex(M).L.mH, P, upper=True, left=False)
    # NumPy's own functions for NumPy arrays, without the compat layer's wrappers (some 10 us each)
    linalg = numpy.linalg if type(M) is numpy.ndarray else xp.linalg
    if _is_dask(xp):  # (Dask's inv is 2-D only: a batch of panels failed in its LU)
        lower = numpy.linalg.cholesky(numpy.asarray(M))
        return panel_times_small(xp, P, xp.asarray(numpy.linalg.inv(numpy.conj(numpy.swapaxes(lower, -1, -2)))))
    lower = linalg.cholesky(M)
    return panel_times_small(xp, P, linalg.inv(mH(xp, lower)))


def _dask_matrix_by_matrix(A, function, signature, outputs, output_sizes):
    """``function`` (a batched NumPy factorisation) applied lazily to each
    matrix of the Dask stack A (..., m, n), one task per chunk of the batch
    axes; ``outputs``: the (dtype, number of core axes) of each result.
    Dask's own ``linalg.qr`` and ``linalg.svd`` take a 2-D array only. (The
    results' empty NumPy arrays are given as ``meta``: from ``output_dtypes``
    Dask makes them by casting A's, a ComplexWarning for a real S.)"""
    batch = A.ndim - 2
    meta = tuple(numpy.empty((0,) * (batch + core), dtype=dtype) for dtype, core in outputs)
    return sys.modules["dask.array"].apply_gufunc(function, signature, A, meta=meta, output_sizes=output_sizes,
                                                  allow_rechunk=True)


def upper_triangle(xp, A, k=0):
    """``xp.triu(A, k=k)``. Dask builds the mask of a complex A as a complex
    array cast from integers, and warns that the imaginary part is dropped
    (there is none): there the entries are selected by a boolean mask."""
    if _is_dask(xp) and is_complex(xp, A.dtype):
        rows, columns = A.shape[-2:]
        above = (xp.arange(columns)[None, :] - xp.arange(rows)[:, None]) >= k
        return xp.where(above, A, xp.zeros_like(A))
    return xp.triu(A, k=k)


def _reduced_qr_numpy(A):
    return tuple(numpy.linalg.qr(A, mode="reduced"))


def _thin_svd_numpy(A):
    return tuple(numpy.linalg.svd(A, full_matrices=False))


def reduced_qr(xp, A):
    """``xp.linalg.qr(A, mode="reduced")``: (Q, R) of each matrix of A
    (..., m, n). Dask factors a stack matrix by matrix (its own QR is 2-D
    only); a matrix goes to its tall-and-skinny QR as before."""
    if _is_dask(xp) and A.ndim > 2:
        k = min(A.shape[-2:])
        return _dask_matrix_by_matrix(A, _reduced_qr_numpy, "(m,n)->(m,k),(k,n)", [(A.dtype, 2), (A.dtype, 2)],
                                      {"k": k})
    return xp.linalg.qr(A, mode="reduced")


def thin_svd(xp, A):
    """``xp.linalg.svd(A, full_matrices=False)``. Dask's SVD takes a matrix
    chunked along one axis only: a W chunked along both (the sum of a
    row-chunked W and a low-rank update is) gets one chunk across its shorter
    axis first. Its graph of a complex matrix warns that a complex value is
    cast to real (Dask 2025-2026, in the guess of a block's dtype; the
    factors are right, to 5e-16 of NumPy's): not the caller's concern. A
    Dask stack (..., m, n) is factored matrix by matrix (Dask's SVD is 2-D
    only)."""
    if _is_dask(xp) and A.ndim > 2:
        k = min(A.shape[-2:])
        outputs = [(A.dtype, 2), (real_dtype(xp, A.dtype), 1), (A.dtype, 2)]
        return _dask_matrix_by_matrix(A, _thin_svd_numpy, "(m,n)->(m,k),(k),(k,n)", outputs, {"k": k})
    if _is_dask(xp) and A.ndim == 2:
        A = A.rechunk({1: -1} if A.shape[0] >= A.shape[1] else {0: -1})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", numpy.exceptions.ComplexWarning)
            return xp.linalg.svd(A, full_matrices=False)
    return xp.linalg.svd(A, full_matrices=False)


def max_abs(xp, Y, axis=(-2, -1)):
    """The largest |entry| of each matrix of Y, shape (..., 1, 1); with
    ``axis=-2`` that of each column, shape (..., 1, k).

    One reduction in every library; NumPy's ``vector_norm(ord=inf)`` over two
    axes costs four times as much Python as its ``abs().max()``, and a step
    makes four of them (the sketch's rescalings). Dask's ``max`` of a stack
    with an empty batch computes an array of another shape ((1, 1, 0) for a
    (0, 6, 4) stack's columns, where (0, 1, 4) was announced); its
    ``vector_norm`` does not."""
    if getattr(xp, "__name__", "") in ("numpy", "array_api_compat.numpy"):
        return xp.abs(Y).max(axis=axis, keepdims=True)
    return xp.linalg.vector_norm(Y, axis=axis, keepdims=True, ord=float("inf"))


def frobenius_norm(xp, X):
    """``xp.linalg.matrix_norm(X)`` of each matrix of X, with the derivative 0
    where X is 0, as PyTorch's: JAX differentiates sqrt(sum |x|^2) at 0 as
    NaN, and a penalty ``unitarity_error(W)`` took a NaN gradient at every
    exactly unitary W (the identity, a permutation). Where X is 0 the norm is
    taken of ones and replaced by 0: no gradient reaches X there, and the
    comparison that selects it has none (two elementwise selections more, on
    the small matrices of the diagnostics)."""
    zero = max_abs(xp, X) == 0
    norm = xp.linalg.matrix_norm(xp.where(zero, xp.ones_like(X), X))
    return xp.where(zero[..., 0, 0], xp.zeros_like(norm), norm)


def _exponent_of(xp, magnitude):
    """round(log2(magnitude)), entry by entry (0 where ``magnitude`` is 0).
    ``round`` has a zero derivative: autograd differentiates a quantity
    scaled by its power of two as the unscaled one."""
    return xp.round(xp.log2(xp.where(magnitude > 0, magnitude, xp.ones_like(magnitude))))


def times_inverse_power_of_two(xp, A, magnitude):
    """``A * 2**-round(log2(magnitude))`` (magnitude broadcasting against A;
    a factor 1 where it is 0): A brought near unit size by the power of two
    of its largest |entry| ``magnitude``, exactly (a power of two only moves
    exponents), so that its squares neither overflow nor underflow. Applied
    as two factors of half the exponent each: the power a
    subnormal magnitude asks for does not exist in its own dtype (2**133 for
    a float32 1e-40 is Inf, and project_unitary(method="newton_schulz")
    refused 1e-40 times a unitary matrix as singular), while each half does.
    Exact, as one factor would be."""
    first, second = inverse_power_of_two_halves(xp, magnitude)
    return A * xp.astype(first, A.dtype, copy=False) * xp.astype(second, A.dtype, copy=False)


def inverse_power_of_two_halves(xp, magnitude):
    """The two factors of :func:`times_inverse_power_of_two`, in
    magnitude's dtype: their product is ``2**-round(log2(magnitude))``
    (1 where ``magnitude`` is 0), each of them representable where the
    product need not be."""
    return _inverse_halves(xp, _exponent_of(xp, magnitude))


def _inverse_halves(xp, exponent):
    half = xp.floor(exponent / 2)
    return 2.0 ** -half, 2.0 ** (half - exponent)


def split_power_of_two(xp, x):
    """(m, e) with ``x = m * 2**e`` exactly, ``e = round(log2|x|)`` (0 where x
    is 0), entry by entry, for a real array x: m is within a factor sqrt(2)
    of 1 (0 for 0), the power applied in two halves as in
    :func:`times_inverse_power_of_two`."""
    exponent = _exponent_of(xp, xp.abs(x))
    first, second = _inverse_halves(xp, exponent)
    return x * first * second, exponent


def panel_times_small(xp, P, T):
    """``P @ T`` for a thin panel P (..., n, r) and a small T (..., r, s), laid
    out column by column (the transpose of a row-major (s, n) array).

    A big matrix times a thin panel is a pass over the big matrix; PyTorch's
    CPU matmul takes a slow path, up to 3x slower, when the thin operand is
    row-major with 2 to 8 columns, and no library is slower with the column
    layout. Every panel that a step multiplies a big matrix by is made here.
    """
    return mT(xp, mT(xp, T) @ mT(xp, P))


def finite_or_zero(xp, x):
    """x with its NaN and Inf entries replaced by 0. One operation for real
    PyTorch tensors (``nan_to_num``), where the standard's
    ``where(isfinite(x), x, 0)`` dispatches five; complex ones take the
    standard's form, which ``torch.compile`` can lower (its ``nan_to_num``
    cannot)."""
    if _is_torch(xp) and not is_complex(xp, x.dtype):
        return sys.modules["torch"].nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return xp.where(xp.isfinite(x), x, xp.zeros_like(x))


def is_column_major(x) -> bool:
    """Whether the matrices of x are stored column by column (a transposed
    view, a LAPACK result, ``np.asfortranarray``). The standard has no notion
    of layout; NumPy, CuPy and PyTorch expose strides, and an elementwise pass
    that mixes the two layouts is several times slower than one that does not.
    Other libraries answer False."""
    if x.ndim < 2 or x.shape[-1] == 1 or x.shape[-2] == 1:
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):  # (Dynamo traces no str.startswith of a module name)
        strides = x.stride()
    else:
        strides = getattr(x, "strides", None)
    if not strides or len(strides) != x.ndim:
        return False
    return abs(strides[-2]) < abs(strides[-1])


# --- full-precision products -------------------------------------------------

# Where a library may compute float32 products in a reduced format, and the
# value that asks it for true float32 (IEEE) products. JAX on NVIDIA GPUs
# computes float32 products in TF32 (10 mantissa bits) unless told otherwise;
# PyTorch does after torch.set_float32_matmul_precision("high") or
# torch.backends.cuda.matmul.allow_tf32 = True, common in training scripts.
# Steps computed so drift from unitary with every step (H200, 2026-12-04,
# n = 1024, float32: torch "high" 1.2e-6 after one step and up to 2.7e-5 after
# 20, against 7.2e-7 with "highest"; under JAX's default, 239 of the GPU test
# matrix's float32 and complex64 tests failed, and a check of unitarity, whose
# own product ran in TF32, read 2.9e-4 for every W).
_TORCH_MATMUL_BACKENDS = ("cuda", "mkldnn")


def _torch_products_in_ieee(torch):
    """Every torch matmul backend whose float32 products are set to a reduced
    format, set to "ieee"; the (settings, attribute, old value) to restore."""
    changed = []
    for name in _TORCH_MATMUL_BACKENDS:
        settings = getattr(getattr(torch.backends, name, None), "matmul", None)
        if settings is None:
            continue
        old = getattr(settings, "fp32_precision", None)  # one read: each calls into torch
        if old is None:  # PyTorch before 2.9: the TF32 switch alone
            if getattr(settings, "allow_tf32", False):
                changed.append((settings, "allow_tf32", True))
                settings.allow_tf32 = False
            continue
        if old not in ("ieee", "none"):
            changed.append((settings, "fp32_precision", old))
            settings.fp32_precision = "ieee"
    return changed


# Whether this thread runs inside an ``exact_products`` call (see there): the
# optimizers' steps call public entry points, which need not set anything again.
_exact_calls = threading.local()

# The calls of all threads that run with torch's products lifted, and what the
# first of them changed: the last to return restores it. (Each call restored
# what it had changed itself: a call that began while another's lift was in
# force changed nothing, and ran its products in TF32 once the first returned.)
_lifted = {"calls": 0, "changed": []}
_lifted_lock = threading.Lock()


def _lift_torch_products(torch):
    with _lifted_lock:
        if _lifted["calls"] == 0:
            _lifted["changed"] = _torch_products_in_ieee(torch)
        _lifted["calls"] += 1


def _restore_torch_products():
    with _lifted_lock:
        _lifted["calls"] -= 1
        if _lifted["calls"] == 0:
            for settings, name, old in _lifted["changed"]:
                setattr(settings, name, old)
            _lifted["changed"] = []


# The device types whose autocast ``exact_products`` switches off for a call.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "privateuseone")


def _autocast_off(torch, stack):
    """Enter ``torch.autocast(device_type, enabled=False)`` on ``stack`` for
    each device type whose autocast is on in this thread (autocast would run
    the call's float32 products in bfloat16 or float16, and return them so)."""
    any_on = getattr(torch._C, "_is_any_autocast_enabled", None)  # one call, where the build has it
    if any_on is not None and not any_on():
        return
    for device_type in _AUTOCAST_DEVICE_TYPES:
        try:
            on = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type this build does not know
            continue
        if on:
            stack.enter_context(torch.autocast(device_type, enabled=False))


def exact_products(function):
    """Decorate a public entry point so that its matrix products are true
    float32 products whatever the caller's precision settings: the one place
    the library overrides a backend's setting, for the duration of the call.

    JAX: ``jax.default_matmul_precision("highest")``, which also applies while
    ``jax.jit`` traces the call (every ``dot_general`` it records says
    ``Precision.HIGHEST``). PyTorch: a CUDA (or oneDNN) matmul precision set
    to TF32 or bfloat16 is set to "ieee" and restored afterwards, and
    ``torch.autocast`` is switched off for the call (in the caller's thread,
    where autocast applies), outside ``torch.compile`` only (inside a
    compiled region no setting is changed).
    The setting is global while the call runs, so a thread
    running products beside it gets them in float32 too; calls in several
    threads lift it once, and the last to return restores it. Costs a few
    microseconds; only float32 and complex64 products change.
    """

    @functools.wraps(function)
    def in_full_precision(*args, **kwargs):
        if getattr(_exact_calls, "active", False):  # an entry point called by another: already set
            return function(*args, **kwargs)
        torch = sys.modules.get("torch")
        if torch is not None and torch.compiler.is_compiling():
            return function(*args, **kwargs)
        if torch is not None:
            _lift_torch_products(torch)
        _exact_calls.active = True
        try:
            with contextlib.ExitStack() as stack:
                if torch is not None:
                    _autocast_off(torch, stack)
                jax = sys.modules.get("jax")
                if jax is not None:
                    stack.enter_context(jax.default_matmul_precision("highest"))
                return function(*args, **kwargs)
        finally:
            _exact_calls.active = False
            if torch is not None:
                _restore_torch_products()

    return in_full_precision


def _is_torch(xp) -> bool:
    return "torch" in getattr(xp, "__name__", "")


def _is_jax(xp) -> bool:
    return getattr(xp, "__name__", "").startswith("jax")


def _is_dask(xp) -> bool:
    return "dask" in getattr(xp, "__name__", "")


# NumPy, and array_api_strict, whose arrays are NumPy's: the same BLAS.
_NUMPY_NAMES = ("numpy", "array_api_compat.numpy", "array_api_strict")


_lazy_conjugation = _is_torch  # PyTorch conjugates by a flag, read by its matmul


def eye(xp, n: int, *, like):
    """Identity of size n with the dtype and device of ``like``: PyTorch's own
    ``eye`` is one operation, the compat layer's two (zeros, then a fill)."""
    if _is_torch(xp):
        return sys.modules["torch"].eye(n, dtype=like.dtype, device=like.device)
    return xp.eye(n, dtype=like.dtype, device=device(like))


def broadcast_shapes(*shapes):
    """Broadcast shape of the given shapes (the standard's rules); ValueError if
    they do not broadcast."""
    ndim = max([0, *(len(s) for s in shapes)])
    result = []
    for axis in range(-ndim, 0):
        size = 1
        for shape in shapes:
            if len(shape) >= -axis and shape[axis] != 1:
                if size not in (1, shape[axis]):
                    raise ValueError(f"shapes {shapes} do not broadcast")
                size = shape[axis]
        result.append(size)
    return tuple(result)
