"""Derivatives written out for the autodiff systems, where differentiating a
kernel's own operations gives a wrong or undefined result.

This is the one place that knows PyTorch's autograd and JAX's transforms as
such; the formulas are generic (``polar.polar_tangent``) and the rules here
only hand them to each system. Each ``*_rule(A)`` returns the function to call
on A, or None where A belongs to a library without autodiff (the kernel's own
code runs).
"""

from __future__ import annotations

import functools
import sys


def _library(x) -> str:
    return type(x).__module__.partition(".")[0]


def polar_rule(A):
    """The polar factor of a tall or square A with the derivative
    ``polar_tangent``: PyTorch's autograd (reverse and forward mode, and the
    ``torch.func`` transforms) or JAX's (``jax.custom_jvp``, which ``grad``
    transposes), or None."""
    library = _library(A)
    if library == "torch":
        from .torch._autodiff import polar_factor

        return polar_factor
    if library in ("jax", "jaxlib"):
        return _jax_polar(sys.modules["jax"])
    return None


@functools.cache
def _jax_polar(jax):
    """The polar factor as a ``jax.custom_jvp``. Its rule is itself JAX code
    of the SVD: a second derivative goes through the SVD's, NaN at repeated
    singular values (a unitary A) and right elsewhere."""
    from array_api_compat import array_namespace

    from .polar import polar_tangent, polar_unchecked
    from ._xp import thin_svd

    @jax.custom_jvp
    def polar(A):
        return polar_unchecked(array_namespace(A), A)

    @polar.defjvp
    def polar_jvp(primals, tangents):
        (A,), (dA,) = primals, tangents
        xp = array_namespace(A)
        P, s, Vh = thin_svd(xp, A)
        return P @ Vh, polar_tangent(xp, P, s, Vh, dA)

    return polar
