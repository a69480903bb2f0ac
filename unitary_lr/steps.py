"""projUNN steps and the tangent-space projection."""

from __future__ import annotations

import numpy as np

from ._cores import add_lowrank, make_cores
from ._flow import checked, fused_right_update, lowrank_update, sketch_panels
from ._host import (
    host_step_views,
    is_traced,
    lean_arrays,
    lean_factors,
    outside_torch_graph,
    sketch_from_host,
    staged,
    torch_factors,
)
from ._random import as_generator, host_normal
from ._validation import (
    check_batch_compatible,
    check_choice,
    check_factor_pair,
    check_finite,
    check_float_dtype,
    check_int,
    check_matrix,
    check_real_gradient,
    check_real_scalar,
    describe,
    namespace_of,
    nonempty_factors,
    refuse_jax_trace,
)
from ._xp import (
    Adjoint,
    broadcast_shapes,
    device,
    exact_products,
    mH,
    namespace,
    untracked,
)
from .rsvd import sketch_width

__all__ = ["STEP_OVERSAMPLE", "STEP_POWER_ITERS", "projunn_step", "projunn_update", "projunn_update_stacked",
           "tangent_project"]

# Sketch defaults of a step, chosen by measurement (float64, NumPy, 2-core CPU;
# asv_benchmarks/benchmarks/sketch.py, SketchChoice, reproduces it). Captured
# energy ||G_k||^2 / ||G_k,opt||^2 measures first-order progress per step:
#   p=0 q=0 (the reference's "LSI"): 0.50-0.65 of optimal, 1.00x time
#   p=0 q=1:                         0.70-0.98 of optimal, 1.13-1.20x time
#   p=4 q=1:                         0.74-1.00 of optimal, 1.55-1.90x time
# One power iteration nearly doubles the progress per step for a few percent
# of time; oversampling turns NumPy's matrix-vector products into slower
# matrix-matrix ones and is not worth it for a step.

#: Oversampling p of a step's sketch when none is given: the sketch has
#: ``rank + p`` columns (at most ``min(n, m)``).
STEP_OVERSAMPLE = 0
#: Power iterations q of a step's sketch when none is given: the sketch makes
#: ``2 + 2 q`` passes over a dense gradient.
STEP_POWER_ITERS = 1

# The step variants (the registry the adapters, the CLI and the benchmarks
# read): name -> what the kernels compute, see lowrank_right_update.
VARIANTS = ("tangent", "direct", "cayley")


@outside_torch_graph(
    "it draws its sketch from a NumPy generator and reads its small matrices on the host; in a graph use "
    "unitary_lr.torch.ProjUNN(..., capturable=True), or unitary_lr.steps.step_unchecked(..., traced=True) with "
    "the sketch drawn by torch")
@exact_products
def projunn_step(
    W,
    G,
    /,
    *,
    lr,
    rank=1,
    variant="tangent",
    oversample=STEP_OVERSAMPLE,
    power_iters=STEP_POWER_ITERS,
    rng=None,
):
    r"""One projUNN gradient step that keeps W exactly unitary, in O(k n m).

    Parameters
    ----------
    W : array, shape (..., n, m)
        Unitary (complex) or orthogonal (real) matrices, square or not: for
        n > m with orthonormal columns (``W^H W = I_m``), for n < m with
        orthonormal rows (stepped through the conjugate transpose); leading
        axes are a batch.
    G : array of shape (..., n, m), or tuple (a, b) of arrays of shapes (..., n, j) and (..., m, j)
        The Euclidean gradient, as PyTorch stores it in ``.grad`` (for complex W,
        ``dL/dRe W + i dL/dIm W``; -G is the steepest-descent direction). A tuple
        means ``G = a @ b^H`` (a linear layer's ``delta x^H``): the sketch runs on
        the factors and no n x m gradient is formed; when ``j <= rank`` the
        factors are used as they are, without a sketch; ``j = 0`` (an empty
        batch) is a zero gradient.
    lr : float
        Learning rate, finite and > 0.
    rank : int, optional
        Rank k of the update, ``1 <= rank <= min(n, m)``.
    variant : {"tangent", "direct", "cayley"}, optional
        With ``A = G_k W^H - W G_k^H`` (G_k the rank-k sketch of G):
        ``"tangent"`` (projUNN-T): ``W <- expm(-lr/2 A) W``, a step along the
        geodesic of the canonical-metric gradient (for square W,
        ``W expm(-lr/2 (W^H G_k - G_k^H W))``). ``"direct"`` (projUNN-D):
        ``W <- polar(W - lr G_k)``, the closest matrix with orthonormal columns.
        ``"cayley"``: ``W <- (I + lr/2 A)^(-1) (I - lr/2 A) W``, the Cayley step
        of full-capacity unitary RNNs (Wisdom et al. 2016) at rank k; it is
        ``expm(-lr A) W`` to second order, the tangent step at ``2 lr``. For
        a wide W (n < m, orthonormal rows) each variant is its conjugate
        transpose's step: tangent ``W expm(-lr/2 (W^H G_k - G_k^H W))``.
    oversample, power_iters : int, optional
        Sketch settings of ``randomized_svd`` for G_k; the defaults were chosen
        by measurement for speed per step (see Notes).
    rng : None, int or numpy.random.Generator, optional
        Source of the sketch's Gaussian test matrix, drawn on the host: the same
        seed gives the same step on every backend and device.

    Returns
    -------
    array, shape of W broadcast with the batch axes of G
        The updated matrices, unitary to rounding, with the namespace, device
        and dtype of W.

    Raises
    ------
    TypeError
        Non-array W or G, mixed libraries, unsupported dtypes, a complex
        gradient for a real W, G a tuple of the wrong length; a call under
        ``jax.jit`` (the sketch is drawn on the host: use
        :func:`unitary_lr.optax.projunn`, or ``unitary_lr.steps.step_unchecked``
        with the sketch given). Under ``torch.compile`` the call runs outside
        the graph, as an eager call (with ``fullgraph=True`` Dynamo refuses
        it, naming it: use ``unitary_lr.torch.ProjUNN(..., capturable=True)``
        or ``step_unchecked`` there).
    ValueError
        G not matching W, ``rank`` outside ``[1, min(n, m)]``, a
        non-positive or non-finite ``lr``, unknown ``variant``, NaN or Inf in G
        or W, a W that is not unitary (relative deviation above 1e-2 on the
        step's directions), a G whose products overflow its dtype.

    Notes
    -----
    With ``G_k = a b^H`` (a = U S, b = V from the sketch), the tangent step is
    ``expm(-lr/2 (a (W b)^H - (W b) a^H)) W`` (:func:`exp_transport`) and the
    direct step is ``polar(W - lr a b^H)`` (:func:`project_unitary_lowrank`);
    both agree with ``W - lr * tangent_project(W, G_k)`` to first order in lr
    (the Cayley step with ``W - 2 lr * tangent_project(W, G_k)``).
    Cost per step: the sketch, ``2 + 2 power_iters`` passes over a dense G, plus
    two passes over W and one rank-2k update: O(k n m). A zero gradient gives
    W back exactly; one of rank below ``rank`` gives the exact step of that
    rank (no NaN from the sketch's null directions). A gradient nearly normal
    to the group (``W^H G`` nearly Hermitian, the step's span spanned by
    columns at an angle theta) is resolved to about eps / theta of the step's
    scale (see "The data flow of a step" in the documentation's mathematics page).
    The NaN/Inf check of a dense G looks at its sketch ``G Omega``, not at G,
    so it costs no extra pass. Kiani et al., "projUNN", NeurIPS 2022, Eqs. 3, 7.

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import projunn_step, random_unitary, unitarity_error
    >>> W = random_unitary(64, dtype="complex128", rng=0)
    >>> rng = np.random.default_rng(1)
    >>> x = rng.standard_normal((64, 8)) + 0j
    >>> delta = rng.standard_normal((64, 8)) + 0j
    >>> W = projunn_step(W, (delta, x), lr=0.01, rank=2, rng=2)
    >>> bool(unitarity_error(W) < 1e-13)
    True
    """
    with fused_right_update(W):  # on a large NumPy W, L is formed as the update is added: one read of W
        L, Rh = projunn_update(W, G, lr=lr, rank=rank, variant=variant, oversample=oversample,
                               power_iters=power_iters, rng=rng)
    return add_lowrank(namespace(W), untracked(W), L, Rh)


@exact_products
def projunn_update(
    W,
    G,
    /,
    *,
    lr,
    rank=1,
    variant="tangent",
    oversample=STEP_OVERSAMPLE,
    power_iters=STEP_POWER_ITERS,
    rng=None,
):
    """:func:`~unitary_lr.projunn_step` as thin factors:
    ``projunn_step(W, G) == W + L @ Rh``.

    Same parameters, checks and random draws as
    :func:`~unitary_lr.projunn_step`; returns ``(L, Rh)`` of shapes
    (..., n, r) and (..., r, m) for W of shape (..., n, m), r <= 2 * rank.
    For code that owns W's memory and applies the update in place (the torch
    adapter adds ``L @ Rh`` to the parameter in one fused pass), which saves
    the new n x n array and a pass.
    """
    return update_seeded(W, G, rng, lr=lr, rank=rank, variant=variant, oversample=oversample,
                         power_iters=power_iters)


def update_seeded(W, G, rng, /, *, lr, rank, variant, oversample, power_iters, arrays_checked=False):
    """:func:`~unitary_lr.steps.projunn_update` with the sketch drawn from ``rng`` (None, a seed
    or a NumPy generator); ``arrays_checked`` as in :func:`update_drawn`."""
    gen = as_generator(rng)
    return update_drawn(W, G, lambda xp, shape, dtype: sketch_draw(xp, shape, dtype=dtype, rng=gen), lr=lr,
                        rank=rank, variant=variant, oversample=oversample, power_iters=power_iters,
                        arrays_checked=arrays_checked)


@exact_products
def projunn_update_stacked(Ws, Gs, /, *, lr, rank=1, variant="tangent", oversample=STEP_OVERSAMPLE,
                           power_iters=STEP_POWER_ITERS, rngs=None):
    """:func:`~unitary_lr.steps.projunn_update` of several matrices of one shape, dtype and
    device, as one batched step: one pass of each batched product and one
    host round trip for all of them, where separate calls make one each.

    Parameters
    ----------
    Ws : sequence of P arrays, each of shape (..., n, m)
        Unitary matrices (orthonormal columns for n > m, rows for n < m), all
        of one shape, dtype, library and device.
    Gs : sequence of P arrays, each of the shape and dtype of ``Ws``
        Their dense Euclidean gradients.
    lr, rank, variant, oversample, power_iters
        As in :func:`~unitary_lr.projunn_step`, shared by all P steps.
    rngs : None or sequence of P None, int seeds or numpy.random.Generator, optional
        The p-th matrix's sketch is drawn from ``rngs[p]`` exactly as
        ``projunn_update(Ws[p], Gs[p], rng=rngs[p])`` draws it, so the factors
        agree with those of P separate calls to rounding and every generator
        advances as it would there. None: every sketch from fresh entropy, as
        ``rng=None`` in :func:`~unitary_lr.steps.projunn_update`. One generator ``g`` shared by
        all, drawn from in order: ``[g] * P``.

    Returns
    -------
    list of P pairs (L, Rh)
        ``Ws[p] + L @ Rh`` is the p-th step; views of the batched factors.

    Raises
    ------
    TypeError
        As :func:`~unitary_lr.projunn_step`, naming ``Ws[p]`` or ``Gs[p]``
        for a non-array; ``rngs`` neither None nor a sequence, or an entry
        ``rngs[p]`` that is not None, an int seed or a generator (named).
    ValueError
        Empty sequences or sequences of different lengths, arrays of more
        than one shape or dtype, and the errors of
        :func:`~unitary_lr.projunn_step` for the stacked arrays (NaN/Inf, a W
        that is not unitary, a bad ``lr``): a caller that must name the
        failing matrix steps them one by one on that error path, as
        ``unitary_lr.torch.ProjUNN`` does.
    """
    if rngs is None:  # as rng=None in projunn_update: every sketch from fresh entropy
        rngs = [None] * len(Ws)
    elif isinstance(rngs, (str, bytes)) or not hasattr(rngs, "__len__") or not hasattr(rngs, "__iter__"):
        raise TypeError(f"rngs must be None or a sequence of one None, int seed or numpy.random.Generator per "
                        f"matrix, got {type(rngs).__name__}: {describe(rngs)}; for one generator g shared by all, "
                        "drawn from in order, pass [g] * len(Ws)")
    if not Ws or len(Ws) != len(Gs) or len(Ws) != len(rngs):
        raise ValueError(f"Ws, Gs and rngs must be non-empty and of one length, got {len(Ws)}, {len(Gs)}, "
                         f"{len(rngs)}")
    generators = []
    for p, rng in enumerate(rngs):
        try:
            generators.append(as_generator(rng))
        except (TypeError, ValueError) as error:
            raise type(error)(f"rngs[{p}]: {error}") from None
    return update_stacked_drawn(
        Ws, Gs, lambda xp, shape, dtype: [sketch_draw(xp, shape, dtype=dtype, rng=g) for g in generators],
        lr=lr, rank=rank, variant=variant, oversample=oversample, power_iters=power_iters)


def update_stacked_drawn(Ws, Gs, draw, /, *, lr, rank, variant, oversample, power_iters):
    """:func:`projunn_update_stacked` with the sketches' host draws made by
    ``draw(xp, shape, dtype)``: a list of P NumPy arrays, the p-th as
    :func:`sketch_draw` makes it for ``shape`` (that of one matrix's sketch).
    For a caller that draws its matrices' sketches in an order of its own
    before the step (``unitary_lr.optim.ProjUNN.step_many``). Ws and Gs are
    non-empty and of one length (:func:`projunn_update_stacked` checks it)."""
    xp = namespace_of(**{f"Ws[{p}]": W for p, W in enumerate(Ws)}, **{f"Gs[{p}]": G for p, G in enumerate(Gs)})
    shapes = {(tuple(x.shape), x.dtype) for x in (*Ws, *Gs)}
    if len(shapes) != 1:
        raise ValueError(f"Ws and Gs must share one shape and dtype, got {sorted(map(str, shapes))}")
    W, G = xp.stack([untracked(W) for W in Ws]), xp.stack([untracked(G) for G in Gs])
    xp, W, G, gradients, lr, rank, oversample, power_iters = _validated(
        W, G, lr=lr, rank=rank, variant=variant, oversample=oversample, power_iters=power_iters)
    shape = sketch_shape(G, rank, oversample)
    host = np.stack(draw(xp, shape[1:], G.dtype))  # the P test matrices' host draws, (P, ..., l, n)
    L, Rh = _drawn_factors(xp, W, G, gradients, host, shape, lr=lr, rank=rank, variant=variant,
                           power_iters=power_iters)
    # (unstack, not L[p]: a Python index is a host-to-device transfer on JAX, refused under a transfer guard)
    return list(zip(xp.unstack(L), xp.unstack(Rh)))


def update_drawn(W, G, draw, /, *, lr, rank, variant, oversample, power_iters, arrays_checked=False):
    """:func:`~unitary_lr.steps.projunn_update` with its sketch's host draw made by ``draw(xp,
    shape, dtype)`` (a NumPy array as :func:`sketch_draw` makes it for
    ``shape``; not called for factors used as they are); see
    :func:`update_stacked_drawn`.

    ``arrays_checked``: the caller vouches for W and a dense G (arrays of one
    library and device, supported dtypes, G of W's shape, no autograd
    history, outside a JAX trace), as the torch optimizer does for a
    parameter and the direction made from its gradient; only the other
    arguments are checked (about 10 us less per step on the CPU, more with
    cold caches). NaN and Inf are found by the step's own checks either way.
    A pair that the library's fast path knows good at a glance
    (``_host.lean_arrays``) skips the arrays' checks as well."""
    known = None if arrays_checked else lean_arrays(W, G)
    if arrays_checked or known is not None:
        W, G = (W, G) if known is None else known
        xp, gradients = namespace(W), {"G": G}
        lr, rank, oversample, power_iters = _checked_options(
            W, lr=lr, rank=rank, variant=variant, oversample=oversample, power_iters=power_iters)
    else:
        xp, W, G, gradients, lr, rank, oversample, power_iters = _validated(
            W, G, lr=lr, rank=rank, variant=variant, oversample=oversample, power_iters=power_iters)
    shape = sketch_shape(G, rank, oversample)
    host = None if shape is None else draw(xp, shape, _dtype(G))
    lean = lean_factors(xp, W, G, host, shape, lr=lr, rank=rank, variant=variant, power_iters=power_iters)
    if lean is not None:
        return lean
    return _drawn_factors(xp, W, G, gradients, host, shape, lr=lr, rank=rank, variant=variant,
                          power_iters=power_iters)


def _drawn_factors(xp, W, G, gradients, host, shape, **options):
    """The general step's factors for the host draw ``host`` of the sketch
    of ``shape`` (None: G's factors used as they are). Small PyTorch CPU
    tensors take NumPy's step on their views (``_host.host_step_views``)
    and get its factors as tensors on the same memory; where that step
    raises (NaN or Inf, a W that is not unitary), PyTorch's step runs on the
    same draw and reports it in its own words, nothing having changed."""
    views = host_step_views(xp, W, G, shape)
    if views is not None:
        try:
            return torch_factors(_sketch_and_run(namespace(views[0]), *views, {"G": views[1]}, host, shape,
                                                 **options))
        except ValueError:
            pass
    return _sketch_and_run(xp, W, G, gradients, host, shape, **options)


def _sketch_and_run(xp, W, G, gradients, host, shape, **options):
    """:func:`_run` with the test matrix made from its host draw, in G's
    dtype, on W's device (the draw goes with the call of the staged sketch,
    see ``_host.staged``)."""
    omega = None if shape is None else sketch_from_host(xp, host, dtype=_dtype(G), device=device(W), staged=True)
    return _run(xp, W, G, gradients, omega, **options)


def _validated(W, G, *, lr, rank, variant, oversample, power_iters):
    """The checks of :func:`~unitary_lr.steps.projunn_update`; (xp, W, G, gradients by name,
    lr, rank, oversample, power_iters), the arrays without autograd history
    and factors promoted to one dtype."""
    factored = isinstance(G, tuple)
    if factored:
        if len(G) != 2:
            raise TypeError(f"G as factors must be a pair (a, b) meaning a @ b^H, got {len(G)} items")
        a, b = G
        xp = namespace_of(W=W, **{"G[0]": a, "G[1]": b})
        a, b = untracked(a), untracked(b)
        gradients = {"G[0]": a, "G[1]": b}
    else:
        xp = namespace_of(W=W, G=G)
        G = untracked(G)
        gradients = {"G": G}
    W = untracked(W)
    _refuse_jax_trace({"W": W, **gradients, "lr": lr})
    check_float_dtype(xp, "W", W)
    for name, x in gradients.items():
        check_float_dtype(xp, name, x)
        check_real_gradient(xp, W, name, x)
    check_matrix("W", W)
    n, m = W.shape[-2], W.shape[-1]
    if factored:
        check_factor_pair("G[0]", a, "G[1]", b, n, f"W of shape {tuple(W.shape)}", b_rows=m)
    else:
        check_matrix("G", G)
        if tuple(G.shape[-2:]) != (n, m):
            raise ValueError(f"G must have shape (..., {n}, {m}) to match W of shape {tuple(W.shape)}, got shape "
                             f"{tuple(G.shape)}")
    check_batch_compatible(W=W, **gradients)
    lr, rank, oversample, power_iters = _checked_options(W, lr=lr, rank=rank, variant=variant, oversample=oversample,
                                                         power_iters=power_iters)
    if factored:
        G = nonempty_factors(xp, *(xp.astype(x, xp.result_type(a, b), copy=False) for x in (a, b)))
    return xp, W, G, gradients, lr, rank, oversample, power_iters


def _checked_options(W, *, lr, rank, variant, oversample, power_iters):
    """The checks of :func:`~unitary_lr.steps.projunn_update`'s options for a W of W's shape:
    (lr, rank, oversample, power_iters) as a float and ints."""
    n, m = W.shape[-2], W.shape[-1]
    lr = check_real_scalar("lr", lr, positive=True)
    rank = check_int("rank", rank, minimum=1)
    if rank > min(n, m):  # the message formed only here: a formatted shape costs 2 us a step
        rank = check_int("rank", rank, maximum=min(n, m),
                         maximum_reason=f" = min(n, m) for W of shape {tuple(W.shape)}")
    check_choice("variant", variant, VARIANTS)
    oversample = check_int("oversample", oversample, minimum=0)
    power_iters = check_int("power_iters", power_iters, minimum=0)
    return lr, rank, oversample, power_iters


def _run(xp, W, G, gradients, omega, *, lr, rank, variant, power_iters):
    """The validated step with its sketch ``omega``, the small Grams' findings
    raised as the public errors (see ``_flow.checked``)."""
    traced = is_traced(W) or any(is_traced(x) for x in gradients.values())
    return checked(
        lambda: step_factors_unchecked(xp, W, G, omega, lr=lr, rank=rank, variant=variant,
                                       power_iters=power_iters, traced=traced),
        xp, {"W": W, **gradients}, sketched=() if isinstance(G, tuple) else ("G",),
    )


def _refuse_jax_trace(arguments):
    """A clear TypeError for a call inside ``jax.jit`` (or grad, vmap, ...).

    The sketch is drawn on the host from a NumPy generator: a trace would run
    that draw once and freeze it into the compiled program, so every jitted
    step would reuse one sketch (and a traced ``lr`` cannot be checked at
    all). The traced ways to step are named in the message."""
    refuse_jax_trace(
        "projunn_step", arguments,
        "it draws its sketch on the host from a NumPy generator, which a trace would freeze into one constant "
        "sketch",
        "Under jit use the optax transformation unitary_lr.optax.projunn, or "
        "unitary_lr.steps.step_unchecked(xp, W, G, omega, ...) with the sketch omega drawn from jax.random (its "
        "shape: unitary_lr.steps.sketch_shape)")


def _dtype(G):
    return G[0].dtype if isinstance(G, tuple) else G.dtype


def sketch_matrix(xp, shape, *, dtype, device, rng):
    """The Gaussian test matrix of ``shape`` (..., n, l), laid out column by
    column (see ``_xp.panel_times_small``): drawn as its (..., l, n) transpose."""
    return sketch_from_host(xp, sketch_draw(xp, shape, dtype=dtype, rng=rng), dtype=dtype, device=device)


def sketch_draw(xp, shape, *, dtype, rng):
    """The host draw behind :func:`sketch_matrix` for ``shape`` (..., n, l):
    a NumPy array (..., l, n), not yet on the device."""
    *batch, n, l = shape
    return host_normal(xp, (*batch, l, n), dtype=dtype, rng=rng)


def sketch_shape(G, rank, oversample):
    """Shape of the Gaussian test matrix for gradient G (an array of shape
    (..., n, m) or factors (a, b) of shapes (..., n, j), (..., m, j)), or None
    when G is factors with at most ``rank`` columns, which the step uses as
    they are. The sketch runs on the smaller side: it has min(n, m) rows
    (a wide G is sketched through its conjugate transpose)."""
    if isinstance(G, tuple):
        a, b = G
        if a.shape[-1] <= rank:
            return None
        batch, (n, m) = broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])), (a.shape[-2], b.shape[-2])
    else:
        batch, (n, m) = tuple(G.shape[:-2]), tuple(G.shape[-2:])
    return (*batch, min(n, m), sketch_width(rank, oversample, n, m))


def step_unchecked(xp, W, G, omega, *, lr, rank, variant, power_iters, traced=True):
    """projunn_step for validated input, with the Gaussian test matrix ``omega``
    given (None: G is factors used as they are; see :func:`sketch_shape`).

    ``traced=True`` keeps the small work on the device, with no Python branch
    on array values and no check, so this traces under ``jax.jit`` and
    ``torch.compile`` with a traced ``lr``; adapters that draw ``omega`` with
    their framework's own generator use it directly.
    """
    return add_lowrank(xp, W, *step_factors_unchecked(xp, W, G, omega, lr=lr, rank=rank, variant=variant,
                                                      power_iters=power_iters, traced=traced))


def step_factors_unchecked(xp, W, G, omega, *, lr, rank, variant, power_iters, traced=True):
    """:func:`step_unchecked` as factors (L, Rh): the new W is W + L @ Rh.

    Eager calls (``traced=False``) check, for free, the small Gram matrices
    of the step: NaN/Inf in G or W, and W's unitarity (``_flow.checked``
    turns their findings into the public errors).
    """
    if W.shape[-2] < W.shape[-1]:
        # a wide W has orthonormal rows: step its conjugate transpose (a tall
        # matrix with orthonormal columns) along G^H, and transpose back; the
        # products read W and G in their own layout (Adjoint, never formed)
        G = (G[1], G[0]) if isinstance(G, tuple) else Adjoint(G)
        L, Rh = step_factors_unchecked(xp, Adjoint(W), G, omega, lr=lr, rank=rank, variant=variant,
                                       power_iters=power_iters, traced=traced)
        return _adjoint_pair(xp, L, Rh)
    cores = make_cores(xp, W, traced)
    if omega is None:
        Y, Z = G
        names, sketched = ("G[0]", "G[1]"), False
    else:
        Y, Z = sketch_panels(xp, G, omega, power_iters)
        names, sketched = (("G[0]", "G[1]") if isinstance(G, tuple) else ("G", "G")), True
    Y, Z = (xp.astype(x, W.dtype, copy=False) for x in (Y, Z))
    return lowrank_update(xp, W, Y, Z, lr=lr, variant=variant, rank=rank,
                          cores=cores, sketched=sketched, names=names)


@staged()
def _adjoint_pair(xp, L, Rh):
    """(Rh^H, L^H): the factors of a wide W's step from those of its tall W^H."""
    return mH(xp, Rh), mH(xp, L)


@exact_products
def tangent_project(W, G, /):
    r"""Project a Euclidean gradient onto the tangent space at W of the unitary
    group, or of the Stiefel manifold for rectangular W.

    Parameters
    ----------
    W : array, shape (..., n, m)
        Unitary (complex) or orthogonal (real) matrices; for n > m, matrices
        with orthonormal columns (``W^H W = I_m``), for n < m with orthonormal
        rows (``W W^H = I_n``).
    G : array, shape (..., n, m)
        Euclidean gradient (PyTorch's ``.grad`` convention); batch axes
        broadcast with W.

    Returns
    -------
    array, shape (..., n, m)
        ``G - W sym(W^H G)`` with ``sym(X) = (X + X^H) / 2`` (n >= m; for n < m
        ``G - sym(G W^H) W``): the Riemannian gradient for the metric inherited
        from ``Re tr(X^H Y)``, with dtype ``result_type(W, G)``. For square W
        it is ``W skew(W^H G) = (G - W G^H W) / 2``.

    Raises
    ------
    TypeError
        Non-array arguments, mixed libraries, unsupported dtypes, a complex G
        for a real W (as :func:`projunn_step`).
    ValueError
        G of another shape than W, NaN or Inf in W or G (not checked under
        ``jax.jit``, ``torch.compile`` or a CUDA-graph capture, where the
        projection runs traced and values cannot be read: there NaN and Inf
        carry through to the result).

    Notes
    -----
    The tangent space at W (n >= m) is ``{Z : W^H Z + Z^H W = 0}`` and the
    orthogonal projection onto it is ``G - W (W^H G + G^H W) / 2`` (Edelman,
    Arias, Smith 1998, Sect. 2.2.1). The step variants move along the
    canonical metric's gradient ``A W``, ``A = G W^H - W G^H``, which agrees
    with twice this projection on W's range and with it on the complement
    (see the mathematics page). Dense, O(n m^2): meant for users and tests,
    not for the training hot path (``projunn_step`` never forms it).

    Examples
    --------
    >>> import numpy as np
    >>> from unitary_lr import random_unitary, tangent_project
    >>> W = random_unitary(4, dtype="float64", rng=0)
    >>> G = np.random.default_rng(1).standard_normal((4, 4))
    >>> A = W.T @ tangent_project(W, G)
    >>> bool(np.allclose(A, -A.T))
    True
    >>> V = random_unitary(6, 2, dtype="float64", rng=2)  # orthonormal columns
    >>> Z = tangent_project(V, np.ones((6, 2)))
    >>> bool(np.allclose(V.T @ Z + Z.T @ V, 0))
    True
    """
    xp = namespace_of(W=W, G=G)
    check_float_dtype(xp, "W", W)
    check_float_dtype(xp, "G", G)
    check_real_gradient(xp, W, "G", G)  # (a complex result is no tangent vector of the real group)
    check_matrix("W", W)
    check_matrix("G", G)
    if tuple(G.shape[-2:]) != tuple(W.shape[-2:]):
        raise ValueError(f"G must have shape (..., {W.shape[-2]}, {W.shape[-1]}) to match W of "
                         f"shape {tuple(W.shape)}, got shape {tuple(G.shape)}")
    check_batch_compatible(W=W, G=G)
    check_finite(xp, "W", W)
    check_finite(xp, "G", G)
    dtype = xp.result_type(W.dtype, G.dtype)  # (PyTorch's products do not promote)
    return _tangent_part(xp, xp.astype(W, dtype, copy=False), xp.astype(G, dtype, copy=False))


@staged()
def _tangent_part(xp, W, G):
    """tangent_project of validated W and G; one program on eager JAX arrays
    (see ``_host.staged``)."""
    # sym(S) as S / 2 + S^H / 2: S + S^H overflowed for a float32 G of 1e38,
    # whose projection is representable, and the result was Inf
    if W.shape[-2] < W.shape[-1]:
        S = G @ mH(xp, W)
        return G - (S / 2 + mH(xp, S) / 2) @ W
    S = mH(xp, W) @ G
    return G - W @ (S / 2 + mH(xp, S) / 2)
