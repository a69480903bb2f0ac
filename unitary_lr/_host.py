"""Moving the small matrices of a step between the device and the host (floor 1).

A low-rank step reduces every n x n question to a few r x r ones (r <= 2k + 2p).
On a GPU each small factorization done by the device's LAPACK costs a kernel
launch or more and often a stream synchronisation, which is far more than the
O(k n^2) work of the step itself. So an eager step gathers all its small
matrices, moves them to the host in one transfer, factors them there in
float64 with NumPy, and moves the results back in one transfer.

This is the one place, besides ``_backends``, that knows array libraries by
name: a CUDA tensor or a CuPy array cannot be read through DLPack on the host,
and the fast way to read it is the library's own. Everything else goes
through ``numpy.from_dlpack``.

Inside a traced program (``jax.jit``, ``torch.compile``, CUDA-graph capture) a
host transfer is impossible or breaks the graph; :func:`is_traced` tells the
kernels to keep the small work on the device instead.

Between two transfers an eager step's work on the device is a few passes over
G and W and their small products; on JAX arrays each operation of it is one
dispatch of 10-30 us on a CPU (more on a GPU), so :func:`staged` compiles each
such phase once, with ``jax.jit``, into one dispatch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys

import numpy as np

from ._xp import Adjoint, _is_jax, _is_torch, dtype_name_of, jax_transfers_allowed, mT

__all__ = ["HOST_STACK_BYTES", "from_host", "from_host_pieces", "from_host_stack", "host_cast", "host_step_views",
           "host_views", "is_traced", "lean_arrays", "lean_factors", "outside_torch_graph", "own_transfers",
           "sketch_from_host", "stack_pays", "staged", "to_host", "to_host_pieces", "torch_capturing",
           "torch_factors", "torch_graph_tracing", "transfers"]


class _Counter:
    """How many device-to-host transfers the library has made (tests read it:
    each one is a host synchronisation on an accelerator)."""

    count = 0


transfers = _Counter()


def to_host(xp, x) -> np.ndarray:
    """``x`` (any backend, any device) as a NumPy array; one transfer."""
    transfers.count += 1
    module = type(x).__module__.partition(".")[0]
    if module == "torch":
        # each of detach, cpu and the two resolves is a dispatch of its own
        # (some 2 us on the CPU): only where needed
        if x.requires_grad:
            x = x.detach()
        if not x.is_cpu:
            x = x.cpu()
        if x.is_conj():
            x = x.resolve_conj()
        if x.is_neg():
            x = x.resolve_neg()
        return x.numpy()
    if module == "cupy":
        return x.get()
    try:
        return np.from_dlpack(x)
    except (AttributeError, BufferError, RuntimeError, TypeError, ValueError):  # no DLPack (Dask): by value
        return np.asarray(x)


def _cut(flat, shapes, piece):
    """``piece(part, shape)`` of the consecutive parts of the 1-D ``flat``
    that hold arrays of ``shapes``, in order."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(piece(flat[start:start + size], shape))
        start += size
    return tuple(out)


def to_host_pieces(xp, arrays) -> tuple[np.ndarray, ...]:
    """Several small device arrays of one dtype as NumPy arrays, in one
    transfer: joined on the device and cut on the host; on JAX fetched
    together (``jax.device_get`` starts every copy before it waits on the
    first), where flattening and joining them would be a dispatch each
    (10-30 us on its CPU backend)."""
    if len(arrays) == 1:
        return (to_host(xp, arrays[0]),)
    if _is_jax(xp):
        transfers.count += 1
        return tuple(np.asarray(x) for x in sys.modules["jax"].device_get(list(arrays)))
    # (an empty stack holds nothing to move, and Dask cannot flatten one)
    nonempty = [xp.reshape(a, (-1,)) for a in arrays if math.prod(a.shape)]
    if not nonempty:
        return tuple(to_host(xp, a) for a in arrays)
    flat = to_host(xp, xp.concat(nonempty))
    return _cut(flat, [tuple(a.shape) for a in arrays], lambda part, shape: part.reshape(shape))


def from_host_pieces(xp, flat: np.ndarray, shapes, *, dtype, device):
    """The 1-D NumPy array ``flat`` cut into arrays of ``shapes``, in order,
    on ``device``: one transfer and views of it. On JAX the pieces stay NumPy
    arrays, of the device dtype: they go to a phase that :func:`staged`
    compiles, whose call sends its NumPy arguments to the device of its
    arrays, 8 us each against 20 us for a ``device_put`` (and 33 us for a
    slice of one device array; JAX 0.10.2, CPU)."""
    if _is_jax(xp):
        return _cut(flat, shapes, lambda part, shape: host_cast(part.reshape(shape), dtype))
    whole = from_host(xp, flat, dtype=dtype, device=device)
    return _cut(whole, shapes, lambda part, shape: xp.reshape(part, shape))


def from_host_stack(xp, stack: np.ndarray, *, dtype, device):
    """The NumPy arrays ``stack[0], stack[1], ...`` (of one shape) on
    ``device``, in one transfer: :func:`from_host_pieces` of equal pieces,
    taken as views by index (one operation each, where a slice and a reshape
    are two)."""
    if _is_jax(xp):
        return tuple(host_cast(part, dtype) for part in stack)
    if _torch_cpu(xp, device) and dtype in _torch_host_dtypes():
        # wrapped where they lie: no copy, no indexing dispatch (24 against 6 us)
        stack = np.asarray(stack, dtype=_torch_host_dtypes()[dtype])
        return tuple(_torch_from_numpy(part) for part in stack)
    whole = from_host(xp, stack, dtype=dtype, device=device)
    return tuple(whole[i, ...] for i in range(stack.shape[0]))


def from_host(xp, x: np.ndarray, *, dtype, device, staged=False):
    """A NumPy array as an array of namespace ``xp`` with ``dtype`` on ``device``.
    ``staged``: for a phase that :func:`staged` compiles; on JAX the host
    array in ``dtype``, which the phase's call sends with it, where a
    transfer of its own would be one more dispatch.

    On a CUDA device of PyTorch the copy is asynchronous: ``x`` is copied (and
    cast) into page-locked memory and sent with ``non_blocking=True``. PyTorch
    copies from ordinary NumPy memory synchronously, which waits for every
    kernel queued before it: an eager CUDA step made 3 to 4 such waits
    (H200, 2026-12-04, ``torch.cuda.set_sync_debug_mode``), one for its sketch
    and one for each return of its small results. PyTorch keeps the
    page-locked block until the copy has run, so ``x`` may change at once.
    """
    if staged and _is_jax(xp):
        return host_cast(x, dtype)
    kind = _torch_device_type(xp, device)
    if kind == "cuda":
        torch = sys.modules["torch"]
        pinned = torch.empty(tuple(x.shape), dtype=dtype, pin_memory=True)
        pinned.numpy()[...] = x
        return pinned.to(device=device, non_blocking=True)
    if _is_jax(xp):
        # cast on the host, then one plain transfer: jnp.asarray with a dtype
        # and a device took 80 us a call (JAX 0.10.2, CPU), against 17 us
        return sys.modules["jax"].device_put(host_cast(x, dtype), device)
    if kind == "cpu" and dtype in _torch_host_dtypes():
        # cast by NumPy and wrapped: the memory shared exactly where
        # ``asarray`` shares it (the dtype already right), 3.5 against 8 us
        return _torch_from_numpy(np.asarray(x, dtype=_torch_host_dtypes()[dtype]))
    return xp.asarray(x, dtype=dtype, device=device)


@functools.cache
def _torch_host_dtypes():
    """PyTorch's floating dtypes and their NumPy twins, for the CPU transfers."""
    torch = sys.modules["torch"]
    return {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
            torch.complex64: np.dtype(np.complex64), torch.complex128: np.dtype(np.complex128)}


def _torch_from_numpy(x: np.ndarray):
    """The NumPy array x as a PyTorch CPU tensor on its memory (a copy where
    PyTorch cannot share it: read-only memory, which it would only warn
    about, a byte order of its own, negative strides)."""
    if not x.flags.writeable or not x.dtype.isnative or min(x.strides, default=0) < 0:
        x = np.array(x, dtype=x.dtype.newbyteorder("="))
    return sys.modules["torch"].from_numpy(x)


def sketch_from_host(xp, draw: np.ndarray, *, dtype, device, staged=False):
    """The test matrix (..., n, l) of a host draw (..., l, n): its transpose
    on the device, laid out column by column (see ``_xp.panel_times_small``).
    ``staged``: for a phase that :func:`staged` compiles; on JAX the host
    array, transposed there, which the phase's call sends with it, where a
    transfer and a transpose would be two more dispatches."""
    if staged and _is_jax(xp):
        return np.swapaxes(host_cast(draw, dtype), -1, -2)
    return mT(xp, from_host(xp, draw, dtype=dtype, device=device))


def lean_arrays(W, G):
    """(W, G) without autograd history where a fast path knows the pair to
    be valid arrays of its case at a glance (two square 2-D NumPy arrays of
    one float dtype; PyTorch's: two square float32 or complex64 matrices on
    one device), or None where the general checks are to run. Those that
    remain (the options, NaN and Inf, unitarity) are the general ones."""
    if type(W) is np.ndarray:
        from . import _lean_numpy

        return (W, G) if _lean_numpy.square_pair(W, G) else None
    if type(W).__module__.partition(".")[0] != "torch":
        return None
    from .torch import _lean

    return _lean.lean_arrays(W, G)


def lean_factors(xp, W, G, draw: np.ndarray, shape, *, lr, rank, variant, power_iters):
    """The factors (L, Rh) of a step by a fast path, or None where the
    general step is to run (on the same host ``draw`` of the sketch of
    ``shape``, as :func:`sketch_from_host` takes it). W and G are checked
    arrays and ``lr`` a checked float. Two fast paths for the eager step
    of one square matrix, which give the general step's factors bit for bit
    and return None themselves for anything out of the ordinary (NaN/Inf, a
    W that is not unitary), which the general step then reports
    (docs/benchmarks.md, "A lean eager rank-1 step", "The host's lean
    step"):

    - the host's (``unitary_lr/_lean_numpy.py``), at any rank: NumPy
      arrays, and small PyTorch CPU tensors through their NumPy views
      (within :func:`host_views`' limits for a sketch of two or more
      columns), whose factors come back as tensors on the same memory;
    - PyTorch's (``unitary_lr/torch/_lean.py``), rank 1: float32 and
      complex64 tensors on any device with float64, outside a trace.
    """
    if shape is None or len(shape) != 2:
        return None
    from . import _lean_numpy

    on_torch, wide = _is_torch(xp), shape[-1] != 1
    if not on_torch:
        views = (W, G)
    elif not wide:
        views = _torch_numpy_views(W, G)
    else:  # a sketch of two or more columns: one square matrix, within host_views' limits
        views = host_views(xp, W, G) if W.ndim == 2 and W.shape[-2] == W.shape[-1] else None
    host = None if views is None else _lean_numpy.host_arrays(*views)
    if host is not None:
        factors = _lean_numpy.lean_factors(*host, draw, lr=lr, rank=rank, variant=variant, power_iters=power_iters)
        if factors is None or not on_torch:
            return factors
        return torch_factors(factors)  # a PyTorch CPU tensor's factors
    if not on_torch or wide:
        return None
    from .torch import _lean

    if not _lean.takes_lean_step(W, G, shape):
        return None
    return _lean.lean_factors(W, G, draw, lr=lr, variant=variant, power_iters=power_iters)


# PyTorch CPU tensors of up to this many bytes (float32 256 x 256), or up
# to the second figure (float32 512 x 512) where PyTorch runs one thread, go
# through their NumPy views; larger ones take PyTorch's own lean step
# (``unitary_lr/torch/_lean.py``). NumPy's BLAS (OpenBLAS) runs threads of
# its own beside PyTorch's, and they contend. AMD EPYC, two cores, torch
# 2.13, NumPy 2.4, float32, the two ways alternated in one process, medians:
# - two threads each: at 1024 x 1024 a step through NumPy took 10-12 ms
#   against 3.6 ms by PyTorch's operations (3.0 ms with OPENBLAS_NUM_THREADS
#   = 1); at 512 x 512, 0.98-1.17 against 1.28-1.31 ms, and even (3.4-3.5
#   against 3.6 ms) with a forward product between the steps; at 256 x 256,
#   0.52-0.54 against 0.73-0.76 ms (1.17-1.25 against 1.45-1.47 ms with the
#   forward product);
# - one PyTorch thread: 1.37 against 1.70 ms at 512 x 512, and faster up to
#   1400 x 1400, but there with NumPy's second thread, which PyTorch was not
#   given.
# Complex tensors contend from fewer entries on (TORCH_NUMPY_COMPLEX_ENTRIES).
# Machines with many cores were not measured: their threads contend more.
TORCH_NUMPY_BYTES = 256 * 1024
TORCH_NUMPY_BYTES_ONE_THREAD = 1024 * 1024


def host_step_views(xp, W, G, shape):
    """NumPy views (no copy) of the PyTorch CPU tensors W and a dense G that
    the general step runs on the host, as NumPy's step, where no fast path
    of :func:`lean_factors` took them: a sketch of two or more columns
    (rank >= 2, or oversampled) or a batch of matrices (the optimizer's
    stacked parameters), tensors within the rank-1 limit where PyTorch runs
    one thread, else a quarter of it (:data:`TORCH_NUMPY_PANEL_SHARE`);
    else None (``shape``: the sketch's, see ``steps.sketch_shape``). A small step is nearly all fixed cost, and
    each of PyTorch's CPU operations costs 5-10 us of dispatch where NumPy's
    costs 1-3 us (docs/benchmarks.md, "Rank two and more on the host")."""
    if shape is None or (shape[-1] == 1 and len(shape) == 2):
        return None
    return host_views(xp, W, G)


def host_views(xp, A, B=None):
    """NumPy views (no copy) of the PyTorch CPU tensor A, of one of the host's
    four float dtypes, and of B of A's shape where given, for NumPy's
    routines (a step of two or more sketch columns, ``randomized_svd``):
    within the limits of :data:`TORCH_NUMPY_PANEL_SHARE` and
    :data:`TORCH_NUMPY_COMPLEX_ENTRIES`, and within
    :data:`TORCH_NUMPY_BYTES_ONE_THREAD` where PyTorch runs one thread; else
    None. A tuple of one or two views."""
    if not _is_torch(xp):
        return None
    from . import _lean_numpy

    views = _torch_numpy_views(A, A if B is None else B, share=TORCH_NUMPY_PANEL_SHARE)
    # the host's dtypes: the keys of the lean host step's table of core dtypes
    if views is None or views[0].dtype not in _lean_numpy._CORE or views[0].shape != views[1].shape:
        return None
    return views[:1] if B is None else views


def torch_factors(factors):
    """Factors made by NumPy's routines on a PyTorch CPU tensor's views
    (:func:`host_views`) as PyTorch tensors on the same memory."""
    return tuple(_torch_from_numpy(x) for x in factors)


# Where PyTorch runs several threads, a step of two or more sketch columns
# (and a batch, and ``randomized_svd``) goes through NumPy for tensors of up
# to this share of the limits above: 64 KiB (float32 128 x 128). Its
# products are matrix-matrix ones, which NumPy's OpenBLAS runs on threads of
# its own from smaller sizes on than a matrix-vector product, and they
# contend with PyTorch's (two each on two cores, a forward product between
# the steps, float32, rank 8: at 256 x 256 a step took 8.0 ms through NumPy
# against 1.2 ms by PyTorch's operations, 6.5 against 1.4 ms since the
# host's lean step of rank two and more; at 128 x 128, 0.83 against 1.02
# ms). Where PyTorch runs one thread, there is nothing to contend with, and
# the steps take the rank-1 limit (1 MiB): since the host's lean step and
# the host cores' fast paths, NumPy's way took 0.65-0.88x PyTorch's time for
# one matrix (float32 362 x 362 and 512 x 512, float64 362 x 362, complex64
# 256 x 256 and 362 x 362, complex128 256 x 256; rank 2 and 8), 0.71-0.89x
# for batches of 1 MiB; with one BLAS thread (OPENBLAS_NUM_THREADS=1)
# 0.74-0.98x and 0.71-0.90x. (Intel Xeon, two cores, torch 2.13, NumPy 2.4
# with OpenBLAS 0.3.31, 2026-12-06, the two ways alternated call by call with
# a forward product between the calls; docs/benchmarks.md, "The host's lean
# step of rank two and more".)
TORCH_NUMPY_PANEL_SHARE = 0.25

# ``randomized_svd`` takes the same limits. Where PyTorch runs one thread it
# kept a quarter of the rank-1 limit until the host's lean randomized SVD
# (``_lean_numpy.svd_factors``): through NumPy it had taken 1.07-1.14x
# PyTorch's time at rank 1 with one BLAS thread. Since, from 256 KiB to
# 1 MiB, 0.83-0.98x with one BLAS thread and 0.71-0.76x with NumPy's
# (float32 362 x 362 and 512 x 512, float64 362 x 362, complex64 256 x 256
# and 362 x 362, complex128 256 x 256, ranks 1 and 8; batches of 1 MiB
# through NumPy's general routine 0.89-0.99x and 0.81-1.00x; same machine,
# 2026-12-06, 19:55 UTC).

# Where PyTorch runs several threads, complex matrices of this many entries
# or more keep PyTorch's operations whatever the sketch: OpenBLAS threads
# complex products from there on, and a step through NumPy took 7-8 ms, at
# rank 8 up to 16 ms, against 0.35-1.5 ms (complex64 64 x 64 to 181 x 181,
# complex128 64 x 64; 63 x 63 and smaller ran 0.6-0.85x PyTorch's time;
# same machine and runs).
TORCH_NUMPY_COMPLEX_ENTRIES = 4096


def _numpy_pays(torch, W, share):
    """Whether the CPU tensor W takes the host's step through its NumPy view:
    within :data:`TORCH_NUMPY_BYTES_ONE_THREAD` where PyTorch runs one
    thread; where it runs several, within ``share`` of
    :data:`TORCH_NUMPY_BYTES`, a complex W only below
    :data:`TORCH_NUMPY_COMPLEX_ENTRIES` entries a matrix."""
    if torch.get_num_threads() == 1:
        return W.numel() * W.element_size() <= TORCH_NUMPY_BYTES_ONE_THREAD
    if W.numel() * W.element_size() > share * TORCH_NUMPY_BYTES:
        return False
    return not W.is_complex() or W.shape[-2] * W.shape[-1] < TORCH_NUMPY_COMPLEX_ENTRIES


def _torch_numpy_views(W, G, share=1.0):
    """Two PyTorch CPU tensors (or parameters) of at most
    :data:`TORCH_NUMPY_BYTES_ONE_THREAD` each where PyTorch runs one
    thread, else :data:`TORCH_NUMPY_BYTES` times ``share``, with the bound
    of :data:`TORCH_NUMPY_COMPLEX_ENTRIES` (:func:`_numpy_pays`), without
    conjugate or negative bits, outside ``torch.compile``, as their NumPy
    views (no copy; the autograd history dropped), for the host's fast
    path; else None."""
    torch = sys.modules["torch"]
    if not (type(W) in (torch.Tensor, torch.nn.Parameter) and type(G) in (torch.Tensor, torch.nn.Parameter)
            and W.is_cpu and G.is_cpu and W.layout is torch.strided and G.layout is torch.strided
            and W.ndim >= 2 and _numpy_pays(torch, W, share)
            and not (W.is_conj() or G.is_conj()) and not (W.is_neg() or G.is_neg())
            and not torch.compiler.is_compiling()):
        return None
    return (W.detach() if W.requires_grad else W).numpy(), (G.detach() if G.requires_grad else G).numpy()


def host_cast(x: np.ndarray, dtype) -> np.ndarray:
    """The NumPy array x in the JAX ``dtype`` (a NumPy dtype), for a transfer."""
    return np.asarray(x, dtype=np.dtype(dtype))


def _torch_device_type(xp, device):
    """``device.type`` ("cpu", "cuda", ...) of a device named for PyTorch
    namespace ``xp``; None for other libraries and for None, the default
    device (which ``torch.set_default_device`` may have made a GPU)."""
    if device is None or not _is_torch(xp):
        return None
    # a torch.device (what a tensor's ``device`` is) answers at once; making
    # one from a string or an index costs some 8 us, twice a step
    kind = getattr(device, "type", None)
    return kind if kind is not None else sys.modules["torch"].device(device).type


def _torch_cpu(xp, device) -> bool:
    """Whether ``device`` is named, and is PyTorch's CPU."""
    return _torch_device_type(xp, device) == "cpu"


def _torch_cuda(xp, device) -> bool:
    """Whether ``device`` is a CUDA device of PyTorch namespace ``xp``."""
    return _torch_device_type(xp, device) == "cuda"


def is_jax_tracer(x) -> bool:
    """Whether ``x`` is a JAX tracer (under ``jax.jit``, ``grad``, ``vmap``
    ...): an array whose values no Python code can read, where a tensor under
    ``torch.compile`` is read at a graph break."""
    if type(x).__module__.partition(".")[0] not in ("jax", "jaxlib"):
        return False
    jax_core = sys.modules.get("jax.core")
    return jax_core is not None and isinstance(x, jax_core.Tracer)


def is_traced(x) -> bool:
    """Whether ``x`` is a placeholder of a traced program (a JAX tracer, a tensor
    under ``torch.compile`` or ``torch.func.vmap``, or any tensor while a CUDA
    graph is being captured), whose values cannot be read on the host."""
    path = type(x).__module__
    module = path.partition(".")[0]
    if module == "jax" or module == "jaxlib":
        return is_jax_tracer(x)
    if module == "torch":
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return True
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        # torch.func.vmap's batched tensors, whose values cannot be read
        # either (not grad's tracking tensors: the kernels that take factors
        # drop their inputs' autograd history, so a traced call there gave a
        # wrong gradient where the host's read fails with an error)
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(x):
            # (under vmap(grad(f)) the batched tensor is inside grad's wrapper,
            # and the check's read of it failed)
            if functorch.is_batchedtensor(x):
                return True
            x = functorch.get_unwrapped(x)
        # the fake and functional tensors of torch's tracers, seen outside
        # is_compiling; not torch's other subclasses (a DTensor holds values,
        # and its checks must run)
        return path.startswith("torch._subclasses.")
    return False


def torch_graph_tracing() -> bool:
    """Whether PyTorch's Dynamo is tracing the caller (``torch.compile``,
    ``torch.export``); False where PyTorch was never imported."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def torch_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream; False
    where PyTorch was never imported or never initialised CUDA."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def outside_torch_graph(reason, *, name=None):
    """Decorator for a call that reads values on the host or draws from a
    NumPy generator (``reason`` says which): under ``torch.compile`` it ends
    the graph and runs eagerly, as outside it; under ``fullgraph=True``
    Dynamo refuses it with an error that quotes ``name`` (the public call,
    by default the function's name) and ``reason``.

    Left to Dynamo, such a call traced the host's NumPy code through PyTorch's
    NumPy emulation (``randomized_svd`` stopped on a reversed slice there) and
    broke the graph wherever that emulation gave up. The call runs with
    Dynamo disabled (``torch.compiler.disable``) whenever PyTorch is loaded,
    not only while Dynamo traces this frame: after a graph break Dynamo runs
    a frame untraced but still compiles the frames it calls. That costs
    about 0.5 us a call; without PyTorch, a dictionary lookup.

    While a CUDA graph is being captured the call is a RuntimeError that
    names it and quotes ``reason``, raised before it starts: its host reads
    would end the capture with a bare CUDA error."""
    def decorate(function):
        public = name or function.__qualname__
        message = f"unitary_lr: {public} runs outside the graph: {reason}"

        @functools.wraps(function)
        def call(*args, **kwargs):
            torch = sys.modules.get("torch")
            if torch is None:
                return function(*args, **kwargs)
            if torch.compiler.is_compiling():
                torch._dynamo.graph_break(msg=message)
            elif torch_capturing():
                raise RuntimeError(f"unitary_lr: {public} cannot be captured in a CUDA graph: {reason}")
            return _without_dynamo(function)(*args, **kwargs)
        return call
    return decorate


@functools.cache
def _without_dynamo(function):
    """``function`` as ``torch.compiler.disable`` wraps it, made once."""
    return sys.modules["torch"].compiler.disable(function)


def staged(*static):
    """Decorator for a phase of an eager step on the device, a function
    ``phase(xp, *arrays, **options)`` whose arguments named in ``static`` fix
    its shapes and its Python control flow (the rest are arrays, Adjoint
    views, tuples, lists and dicts of them, None or Python numbers; on JAX
    the host's NumPy results too, which the call sends to the device with
    it).

    Called with JAX arrays outside a trace, the phase runs as one program
    compiled by ``jax.jit`` (once per shape, dtype and static value; JAX
    caches it), where each of its operations would be a dispatch of its own:
    an eager rank-1 step of a 64 x 64 float32 matrix made about 40. The
    operations, and so the kernels' choices that depend on tracing (see
    ``_xp.by_columns``), are those of the jitted steps. Any other library,
    and a call inside a trace, runs the phase as it is.
    """

    def decorate(phase):
        compiled = []

        @functools.wraps(phase)
        def run(xp, *args, **kwargs):
            if not _is_jax(xp) or any(is_traced(x) for x in _leaves(args)):
                return phase(xp, *args, **kwargs)
            if not compiled:
                jax = sys.modules["jax"]
                _register_adjoint(jax)
                # static by position too: jax.jit infers the positions of
                # static_argnames only when it is given no static_argnums
                positional = [name for name, parameter in inspect.signature(phase).parameters.items()
                              if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
                compiled.append(jax.jit(phase, static_argnames=static, static_argnums=(
                    0, *(positional.index(name) for name in static if name in positional))))
            # the NumPy arguments are this library's own transfers, as a
            # device_put would be
            with own_transfers(xp):
                return compiled[0](xp, *args, **kwargs)

        return run

    return decorate


def own_transfers(xp):
    """A context in which the library's own host-to-device transfers pass a
    caller's ``jax.transfer_guard("disallow")`` (a guard is for the caller's
    accidental transfers): on JAX, eager operations that make new arrays
    (zeros of a state, an array made to ask for the namespace) send a
    scalar; elsewhere nothing."""
    return jax_transfers_allowed() if _is_jax(xp) else contextlib.nullcontext()


def _leaves(args):
    for x in args:
        if isinstance(x, (tuple, list)):
            yield from _leaves(x)
        elif isinstance(x, dict):
            yield from _leaves(x.values())
        elif isinstance(x, Adjoint):
            yield x.M
        elif x is not None:
            yield x


@functools.cache
def _register_adjoint(jax):
    """Adjoint views cross a jax.jit boundary as the matrix they view."""
    jax.tree_util.register_pytree_node(Adjoint, lambda view: ((view.M,), None), lambda _, children: Adjoint(*children))


# On the host (a CPU) a batched step of several matrices pays for matrices of
# up to this many bytes each (float32 256 x 256): there separate steps cost
# 1.03-3.3x as much, with two to eight matrices and ranks 1 and 8. From about
# 512 KiB (float64 or complex64 256 x 256) up, copying the matrices and their
# gradients into a stack costs as much as the fixed cost per step it saves, or
# more (0.46-0.95x at rank 1 from float32 512 x 512). Measured with the torch
# optimizer; see the documentation's benchmarks, "Many unitary parameters".
HOST_STACK_BYTES = 256 * 1024


def stack_pays(x) -> bool:
    """Whether matrices like ``x`` are best stepped together, as one batch:
    always on an accelerator (each separate step is a host round trip, a
    stream synchronisation, and its own launches), and on the host for
    matrices of at most :data:`HOST_STACK_BYTES`."""
    module = type(x).__module__.partition(".")[0]
    if module == "torch":
        if not x.is_cpu:
            return True
        return x.numel() * x.element_size() <= HOST_STACK_BYTES
    if module == "cupy":
        return True
    if module in ("jax", "jaxlib") and any(d.platform != "cpu" for d in x.devices()):
        return True
    return math.prod(x.shape) * np.dtype(dtype_name_of(x.dtype)).itemsize <= HOST_STACK_BYTES
