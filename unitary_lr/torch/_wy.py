"""The compact WY factors of a product of Householder reflectors with a
hand-written gradient, for the torch adapters' training passes.

``householder.wy_factors`` is a chain of some twenty small operations (the
Gram matrix, the column lengths, the triangular inverse); autograd records
each and replays about as many in the backward pass. In an HTA layer's
forward + backward pass (768 x 768, batch 64, 8 reflectors a side, one CPU
thread) the recorded factors cost up to a third of the pass (2.7 against
1.9 ms with the factors' gradient switched off, in one measurement). Here the
forward pass runs the same generic code without recording, and the backward
pass is its closed-form gradient: a dozen operations on n x j and j x j
arrays.

The gradient, for U = V diag(s), s_i = 1 / |v_i| (1 for a zero column),
K = U^H U, A = triu(K, 1) + D with constant pivots D and M = -A^{-1} (the
factors returned are U and M), with torch's convention ``dL = Re tr(g^H dX)``:

    g_A = M^H g_M M^H,       g_K = triu(g_A, 1),
    g_U' = g_U + U (g_K + g_K^H),
    g_V = g_U' diag(s) - V diag(s^3 Re(diag(V^H g_U'))),

the last term zero for a zero column (whose v is zero). It is the gradient of
the generic code (``tests/test_torch_adapters.py`` checks the two against
each other in float64, real and complex, with zero columns). Forward mode
(``jvp``) is the same linear map read forwards. Neither is itself
differentiable: second derivatives raise (see ``_autodiff.NotDifferentiable``).
"""

from __future__ import annotations

import torch
from array_api_compat import array_namespace

from .._xp import column_layout, core_dtype
from ..householder import wy_core
from ._autodiff import NotDifferentiable, apply_with_forward_mode


class _WYFactors(torch.autograd.Function):
    # forward and setup_context apart, and a vmap rule made by torch: the
    # torch.func transforms (grad, vmap, per-sample gradients) take only such
    # functions, and refused every adapted layer
    generate_vmap_rule = True

    @staticmethod
    def forward(V):
        """The factors (U, -T), then what the gradient needs (not differentiable)."""
        xp = array_namespace(V)
        wide = V.to(core_dtype(xp, V.dtype, V.device))
        U, minus_T, scale, power = wy_core(xp, wide)
        outputs = column_layout(xp, U.to(V.dtype)), minus_T.to(V.dtype)
        # torch.compile refuses a model holding an adapter where a tensor saved
        # for backward is a view of another or an output ("An intermediate
        # tensor 'power' created inside a higher-order op subgraph aliases an
        # input or output"): power is a view of wy_core's powers of two, and
        # for V in its core dtype (float64) the outputs are U and -T
        # themselves. Copies of O(n j) entries.
        if wide.dtype == V.dtype:
            U, minus_T = U.clone(), minus_T.clone()
        return (*outputs, U, minus_T, scale, power.clone())

    @staticmethod
    def setup_context(ctx, inputs, output):
        (V,) = inputs
        saved = output[2:]
        ctx.mark_non_differentiable(*saved)
        # no zeros made for the gradients of outputs that have none (the
        # saved ones, and U or -T when the loss does not use it)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved, V)
        ctx.save_for_forward(*saved, V)
        ctx.dtype = V.dtype

    @staticmethod
    def backward(ctx, grad_U, grad_minus_T, *_):
        U, M, s, power, V = ctx.saved_tensors
        g_U = torch.zeros_like(U) if grad_U is None else grad_U.to(U.dtype)
        if grad_minus_T is not None:
            Mh = M.mH
            g_K = torch.triu(Mh @ grad_minus_T.to(M.dtype) @ Mh, diagonal=1)
            g_U = g_U + U @ (g_K + g_K.mH)
        # U = V diag(1 / |v|): g_V = (g_U - U Re(diag(U^H g_U))) diag(1 / |v|),
        # written with U, not as g_U / |v| - V Re(diag(V^H g_U)) / |v|^3, whose
        # cube underflows for columns of length 1e155 (float64); 1 / |v| is
        # s * power (see wy_core: its product need not be representable)
        g_s = (U.conj() * g_U).sum(dim=-2)
        if g_s.is_complex():
            g_s = g_s.real
        g_V = (g_U - U * g_s[..., None, :].to(U.dtype)) * s[..., None, :].to(U.dtype)
        g_V = (g_V * power[..., None, :].to(U.dtype)).to(ctx.dtype)
        if torch.is_grad_enabled():  # create_graph=True: the gradient is tied to V, to refuse its derivative
            g_V = NotDifferentiable.apply(g_V, V, _SECOND_DERIVATIVE)
        return g_V


class _WYFactorsForwardMode(_WYFactors):
    """``_WYFactors`` with forward mode, for eager calls
    (:func:`._autodiff.apply_with_forward_mode`)."""

    @staticmethod
    def jvp(ctx, tangent_V):
        """Forward mode (``torch.func.jvp``, ``jacfwd``): the same linear map
        as ``backward``, read forwards: dU = (dV - U Re(diag(U^H dV))) diag(1 / |v|),
        dK = dU^H U + U^H dU, dM = M triu(dK, 1) M."""
        U, M, s, power, V = ctx.saved_tensors
        dV = tangent_V.to(U.dtype)
        along = (U.conj() * dV).sum(dim=-2)
        if along.is_complex():
            along = along.real
        # 1 / |v| applied as its two factors s and power, as in backward
        dU = (dV - U * along[..., None, :].to(U.dtype)) * s[..., None, :].to(U.dtype)
        dU = dU * power[..., None, :].to(U.dtype)
        dK = U.mH @ dU
        dM = M @ torch.triu(dK + dK.mH, diagonal=1) @ M
        # dU in U's layout: forward AD requires a view's tangent to have it.
        # Both tied to V, as the gradient is: a derivative of these (forward
        # over forward, reverse over forward) raises where it would take U
        # and M as constants and be wrong without a word
        dU = column_layout(array_namespace(dU), dU.to(ctx.dtype))
        dU, dM = (NotDifferentiable.apply(d, V, _SECOND_DERIVATIVE) for d in (dU, dM.to(ctx.dtype)))
        return dU, dM, None, None, None, None


_SECOND_DERIVATIVE = (
    "unitary_lr: the Householder factors' hand-written gradient is not differentiable: a second "
    "derivative through householder_apply, householder_product or a HouseholderAdapter of PyTorch "
    "tensors is not supported")


def wy_factors(xp, V):
    """``householder.wy_factors(xp, V)`` with the hand-written gradient."""
    U, minus_T, *_ = apply_with_forward_mode(_WYFactors, _WYFactorsForwardMode, V)
    return U, minus_T
