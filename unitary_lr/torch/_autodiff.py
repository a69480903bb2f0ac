"""PyTorch's autograd for the derivatives that ``unitary_lr._autodiff`` writes
out, and the guard against differentiating them again."""

from __future__ import annotations

import torch
from array_api_compat import array_namespace

from .._xp import thin_svd


class NotDifferentiable(torch.autograd.Function):
    """A hand-written derivative as it is, tied to the input it is the
    derivative at, whose derivative it does not have: a derivative of it
    (reverse or forward mode) raises RuntimeError(message). torch's
    ``once_differentiable`` ties it only to the incoming gradients, and a
    second derivative through the input alone
    (``torch.autograd.functional.hessian``) came back as zeros, without a word."""

    generate_vmap_rule = True

    @staticmethod
    def forward(derivative, at, message):
        return derivative.view_as(derivative)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)

    @staticmethod
    def jvp(ctx, *tangents):  # forward over reverse: torch.func.hessian, jacfwd(jacrev(...))
        raise RuntimeError(ctx.message)


_POLAR_SECOND = ("unitary_lr: project_unitary's derivative is written by hand and is not differentiable: a second "
                 "derivative of project_unitary of PyTorch tensors is not supported")


def _polar_derivative(ctx, direction, *, tie):
    """``polar_tangent`` along direction, tied to A where ``tie`` (forward
    mode, and backward with create_graph=True), to refuse its own derivative."""
    from ..polar import polar_tangent

    P, s, Vh, A = ctx.saved_tensors
    derivative = polar_tangent(array_namespace(P), P, s, Vh, direction.to(P.dtype))
    return NotDifferentiable.apply(derivative, A, _POLAR_SECOND) if tie else derivative


class _PolarFactor(torch.autograd.Function):
    """``U V^H`` of a tall or square A's thin SVD, with the gradient
    ``polar_tangent`` (the map is self-adjoint: the same for both modes)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(A):
        P, s, Vh = thin_svd(array_namespace(A), A)
        return P @ Vh, P, s, Vh

    @staticmethod
    def setup_context(ctx, inputs, output):
        factors = output[1:]
        ctx.mark_non_differentiable(*factors)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*factors, inputs[0])
        ctx.save_for_forward(*factors, inputs[0])

    @staticmethod
    def backward(ctx, grad_Q, *_):
        return None if grad_Q is None else _polar_derivative(ctx, grad_Q, tie=torch.is_grad_enabled())


class _PolarFactorForwardMode(_PolarFactor):
    """``_PolarFactor`` with forward mode, for eager calls
    (:func:`apply_with_forward_mode`)."""

    @staticmethod
    def jvp(ctx, tangent_A):
        return _polar_derivative(ctx, tangent_A, tie=True), None, None, None


def apply_with_forward_mode(function, forward_mode, *args):
    """``function.apply(*args)``, or, in eager calls, ``forward_mode``'s: a
    subclass of ``function`` that adds ``jvp`` (forward-mode AD,
    ``torch.func.jvp``, ``jacfwd``), which Dynamo refuses in an
    ``autograd.Function`` ("Unsupported custom jvp"), so that
    ``torch.compile`` traces ``function`` itself."""
    return (function if torch.compiler.is_compiling() else forward_mode).apply(*args)


def polar_factor(A):
    """The polar factor of a tall or square tensor A, with autograd's
    derivative ``polar_tangent``."""
    return apply_with_forward_mode(_PolarFactor, _PolarFactorForwardMode, A)[0]
