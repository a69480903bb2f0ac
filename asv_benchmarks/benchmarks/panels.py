"""The thin products a step is made of: a large n x n matrix times a panel of
r columns (``A P``), and r rows times it (``P^H A``), as the kernels write them
(``unitary_lr._xp.matmul_panel``, ``adjoint_rows``) and as one plain product.

A step makes four to seven of them, most with r = 1 or 2 at rank 1, and on a
CPU they are its memory traffic. NumPy's OpenBLAS pads a panel of two or three
columns to its kernel's width and multiplies it as slowly as eight, and XLA's
CPU dot does the same to float64 and complex panels, so there the kernels
split such panels into matrix-vector products (``_xp.by_columns``); the gap
between ``time_kernel`` and ``time_one_product`` shows what that choice is
worth, and a library update that changes it shows up here. PyTorch's CPU matmul
takes a panel of a few columns fastest in a transposed form, and a real panel of
many columns (from 8 float32 or 4 float64 ones) as written
(``_xp._TORCH_CPU_DIRECT_ROW_BYTES``): the 16-column cases show that the
kernel's form is the plain product's there. One thread of BLAS is the caller's
choice (``--threads`` of the bench, ``OMP_NUM_THREADS``).
"""

import numpy as np

from unitary_lr._xp import adjoint_matmul, adjoint_rows, blocked_normal, matmul_panel, mH, namespace

from ._support import TIMEOUT, block, host_gaussian, load, to_device


class ThinProducts:
    """``A @ P`` and ``P^H @ A`` for A (n, n) and P (n, r)."""

    params = ([1024, 4096], [1, 2, 3, 4, 8, 16], ["float32", "float64", "complex64"], ["numpy", "torch", "jax"],
              ["A P", "P^H A"])
    param_names = ("n", "r", "dtype", "backend", "product")
    timeout = TIMEOUT

    def setup(self, n, r, dtype, backend, product):
        self.backend = load(backend, dtype)
        rng = np.random.default_rng(0)
        self.A = to_device(self.backend, host_gaussian(rng, (n, n), dtype), dtype)
        self.P = to_device(self.backend, host_gaussian(rng, (n, r), dtype), dtype)
        self.xp = namespace(self.A)

    def time_kernel(self, n, r, dtype, backend, product):
        if product == "A P":
            result = matmul_panel(self.xp, self.A, self.P)
        else:
            result = adjoint_rows(self.xp, self.P, self.A)
        block(self.backend, result)

    def time_one_product(self, n, r, dtype, backend, product):
        if product == "A P":
            result = self.A @ self.P
        else:
            result = mH(self.xp, self.P) @ self.A
        block(self.backend, result)


class SketchPair:
    """The rank-1 sketch's pair of products ``Y = A x / s``, ``A^H Y`` on a
    NumPy A: one pass block by block of rows (``_xp.blocked_normal``, the
    form a step uses for a row-major A beyond the last-level cache) against
    two passes (the plain products). On a 32 MiB cache the blocks gained
    from float64 2048 x 2048 up and lost 8 % at float32 2048 x 2048, which
    still fits it; a machine with another cache moves that line."""

    params = ([2048, 4096], ["float32", "float64", "complex128"])
    param_names = ("n", "dtype")
    timeout = TIMEOUT

    def setup(self, n, dtype):
        rng = np.random.default_rng(0)
        self.A = np.ascontiguousarray(host_gaussian(rng, (n, n), dtype).astype(dtype))
        self.x = host_gaussian(rng, (n, 1), dtype).astype(dtype)

    def time_one_pass(self, n, dtype):
        blocked_normal(self.A, self.x)

    def time_two_passes(self, n, dtype):
        Y = matmul_panel(np, self.A, self.x)
        Y = Y / (np.abs(Y).max() + np.finfo(Y.dtype).smallest_normal)
        adjoint_matmul(np, self.A, Y)
