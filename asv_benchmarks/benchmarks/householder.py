"""Householder products and HTA adapters.

``householder_apply`` (compact WY form, O(j n m)) against multiplying by the
dense product P (O(n^2 m), P formed beforehand and not timed), and the
forward + backward pass of a ``HouseholderAdapter`` against a LoRA adapter of
rank 8 on the same frozen layer. The issue's targets (float32, one CPU thread):
HTA with 1 and 8 reflectors a side at most 2x LoRA r = 8; ``householder_apply``
with j = 32 at most 3x the dense 1024 x 1024 x 64 product.
"""

import numpy as np

from unitary_lr import householder_apply, householder_product

from ._support import BACKENDS, TIMEOUT, block, host_gaussian, load, to_device

COLUMNS = 64  # m: a batch of 64 vectors


class HouseholderApply:
    """``householder_apply(V, X)`` with V (n, j) and X (n, 64), against ``P @ X``."""

    params = ([1024], [1, 8, 32], ["float32", "float64"], BACKENDS)
    param_names = ("n", "j", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, j, dtype, backend):
        self.backend = load(backend, dtype)
        rng = np.random.default_rng(0)
        self.V = to_device(self.backend, host_gaussian(rng, (n, j), dtype), dtype)
        self.X = to_device(self.backend, host_gaussian(rng, (n, COLUMNS), dtype), dtype)
        self.P = householder_product(self.V)
        block(self.backend, self.P)

    def time_householder_apply(self, n, j, dtype, backend):
        block(self.backend, householder_apply(self.V, self.X))

    def time_householder_apply_unchecked(self, n, j, dtype, backend):
        """Without the NaN/Inf check (what the adapters call)."""
        block(self.backend, householder_apply(self.V, self.X, check_finite=False))

    def time_dense_product(self, n, j, dtype, backend):
        block(self.backend, self.P @ self.X)


class AdapterForwardBackward:
    """One training step's forward + backward of a 768 x 768 frozen layer with an
    adapter, batch 64, float32, PyTorch on the CPU with one thread (so that the
    ratio of the adapters is steady on a shared machine)."""

    params = (["HTA j=1", "HTA j=8", "LoRA r=8"],)
    param_names = ("adapter",)
    timeout = TIMEOUT

    def setup(self, adapter):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("PyTorch is not installed") from None
        from unitary_lr.torch import HouseholderAdapter

        self.torch = torch
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        layer = torch.nn.Linear(768, 768)
        if adapter.startswith("HTA"):
            self.module = HouseholderAdapter(layer, reflectors=int(adapter.split("=")[1]), generator=generator)
        else:
            self.module = _lora(torch, layer, rank=8, generator=generator)
        self.x = torch.randn(64, 768, generator=generator)

    def teardown(self, adapter):
        self.torch.set_num_threads(self.threads)

    def time_forward_backward(self, adapter):
        self.module.zero_grad(set_to_none=True)
        self.module(self.x).square().sum().backward()


def _lora(torch, layer, *, rank, generator):
    """The plain low-rank adapter ``y = x W0^T + b + (x A^T) B^T`` (Hu et al.,
    2021) with A Gaussian and B zero at start, written here as the baseline."""

    class LoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = layer
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
            self.A = torch.nn.Parameter(torch.randn(rank, layer.in_features, generator=generator)
                                        / layer.in_features**0.5)
            self.B = torch.nn.Parameter(torch.zeros(layer.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.A.T) @ self.B.T

    return LoRA()
