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
each other in float64, real and complex, with zero columns). The backward
pass is not itself differentiable: second derivatives raise (see
``_NotDifferentiable``).
"""

from __future__ import annotations

import torch
from array_api_compat import array_namespace

from .._xp import column_layout, core_dtype
from ..householder import wy_core


class _WYFactors(torch.autograd.Function):
    @staticmethod
    def forward(ctx, V):
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
        ctx.save_for_backward(U, minus_T, scale, power.clone(), V)
        ctx.dtype = V.dtype
        return outputs

    @staticmethod
    def backward(ctx, grad_U, grad_minus_T):
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
            g_V = _NotDifferentiable.apply(g_V, V)
        return g_V


class _NotDifferentiable(torch.autograd.Function):
    """The hand-written gradient as it is, tied to V, whose derivative it
    does not have: a derivative of the gradient raises. torch's
    ``once_differentiable`` ties it only to the incoming gradients, and a
    second derivative through V alone (``torch.autograd.functional.hessian``
    of an adapted layer's output) came back as zeros, without a word."""

    @staticmethod
    def forward(ctx, gradient, V):
        return gradient.view_as(gradient)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "unitary_lr: the Householder factors' hand-written gradient is not differentiable: a second "
            "derivative through householder_apply, householder_product or a HouseholderAdapter of PyTorch "
            "tensors is not supported")


def wy_factors(xp, V):
    """``householder.wy_factors(xp, V)`` with the hand-written gradient."""
    return _WYFactors.apply(V)
