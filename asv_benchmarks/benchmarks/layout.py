"""Memory layout: a projUNN step given W in column-major order against the
same W in row-major order.

A user's W is column-major when it comes from Fortran-order NumPy
(``np.asfortranarray``, SciPy/LAPACK output) or is a transposed view
(``W.T``, ``W.mT`` of a contiguous tensor). The values are the same, so a step
that cares only about values costs the same; a step that copies, or that
multiplies with the slow stride, shows up here as a gap between the two
layouts. G stays row-major. n = 2048, float64, both variants, NumPy and
PyTorch (torch on the first CUDA GPU when there is one).
"""

import numpy as np

from unitary_lr import projunn_step

from ._support import LEARNING_RATE, TIMEOUT, VARIANTS, block, host_gaussian, host_unitary, load, to_device

LAYOUTS = ["row-major", "column-major"]


def column_major(backend, W):
    """W with the same values, stored column by column."""
    if backend.name == "numpy":
        return np.asfortranarray(W)
    return W.mT.contiguous().mT  # torch: a transposed view of W^T's contiguous copy


class StepLayout:
    """``projunn_step(W, G)``, k = 1, with W row-major or column-major."""

    params = ([2048], ["float64"], VARIANTS, ["numpy", "torch"], LAYOUTS)
    param_names = ("n", "dtype", "variant", "backend", "layout")
    timeout = TIMEOUT

    def setup(self, n, dtype, variant, backend, layout):
        self.backend = load(backend, dtype)
        rng = np.random.default_rng(0)
        W = to_device(self.backend, host_unitary(rng, n, dtype), dtype)
        self.G = to_device(self.backend, host_gaussian(rng, (n, n), dtype, scale=n**-0.5), dtype)
        self.W = column_major(self.backend, W) if layout == "column-major" else W
        self.rng = np.random.default_rng(1)

    def time_step(self, n, dtype, variant, backend, layout):
        W = projunn_step(self.W, self.G, lr=LEARNING_RATE, rank=1, variant=variant, rng=self.rng)
        block(self.backend, W)


class LowRankUpdate:
    """The update every step ends with, ``W + L @ Rh`` (``_xp.add_product``),
    rank 2, on widths whose rows lie a power of two apart (1024) and not
    (1000): PyTorch's CPU gemm runs the first 3-8x slower in float32 and
    complex128, where the library blocks it by rows (``_xp.update_chunk_rows``;
    ``docs/scripts/update_forms.py`` times both forms side by side). A gap
    between the two widths beyond their 5 % difference in size is that slow
    path coming back."""

    params = ([1000, 1024], ["float32", "float64", "complex128"], ["numpy", "torch"])
    param_names = ("n", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, dtype, backend):
        from unitary_lr._xp import add_product

        self.backend = load(backend, dtype)
        self.add_product = add_product
        rng = np.random.default_rng(0)
        self.W = to_device(self.backend, host_gaussian(rng, (n, n), dtype), dtype)
        self.L = to_device(self.backend, host_gaussian(rng, (n, 2), dtype), dtype)
        self.Rh = to_device(self.backend, host_gaussian(rng, (2, n), dtype), dtype)

    def time_update(self, n, dtype, backend):
        block(self.backend, self.add_product(self.backend.xp, self.W, self.L, self.Rh))
