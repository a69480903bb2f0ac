"""The sketch settings of a projUNN step: what ``STEP_OVERSAMPLE`` and
``STEP_POWER_ITERS`` were chosen from.

A step along the rank-k sketch G_k of the gradient lowers the loss, to first
order, by lr * ||G_k||_F^2: the captured energy ||G_k||^2 / ||G_k,opt||^2
(1 for the truncated SVD) is the progress per step, and time_step its cost.
Three gradients: singular values 1/j plus noise (``powerlaw``), exactly rank 32
with a flat spectrum (``batch32``: a linear layer's delta x^H for a batch of
32), and a Gaussian matrix (``gaussian``: no low-rank structure). NumPy,
float64, n = 1024.
"""

import numpy as np

from unitary_lr import projunn_step, randomized_svd

from ._support import host_unitary

N = 1024


def _gradient(kind, rng):
    if kind == "gaussian":
        return rng.standard_normal((N, N)) / np.sqrt(N)
    U = np.linalg.qr(rng.standard_normal((N, 64)))[0]
    V = np.linalg.qr(rng.standard_normal((N, 64)))[0]
    if kind == "batch32":
        return (U[:, :32] * np.linspace(1, 0.3, 32)) @ V[:, :32].T
    return (U / np.arange(1, 65)) @ V.T + 0.01 / np.sqrt(N) * rng.standard_normal((N, N))


class SketchChoice:
    params = ([1, 8], [0, 2, 4, 10], [0, 1, 2], ["powerlaw", "batch32", "gaussian"])
    param_names = ("k", "oversample", "power_iters", "gradient")
    timeout = 300

    def setup(self, k, oversample, power_iters, gradient):
        rng = np.random.default_rng(0)
        self.G = _gradient(gradient, rng)
        self.W = host_unitary(rng, N, "float64")
        self.optimal = float(np.sum(np.linalg.svd(self.G, compute_uv=False)[:k] ** 2))

    def track_captured_energy(self, k, oversample, power_iters, gradient):
        captured = [np.sum(randomized_svd(self.G, k, oversample=oversample, power_iters=power_iters, rng=seed).S ** 2)
                    for seed in range(8)]
        return float(np.mean(captured)) / self.optimal

    track_captured_energy.unit = "||G_k||^2 / optimal"

    def time_step(self, k, oversample, power_iters, gradient):
        projunn_step(self.W, self.G, lr=0.1, rank=k, oversample=oversample, power_iters=power_iters, rng=0)
