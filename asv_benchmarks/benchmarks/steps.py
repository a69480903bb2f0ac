"""projUNN steps on NumPy (the full suite over backends, dtypes and kernels is
the performance issue's work; this is the first, honest slice of it)."""

import numpy as np

import unitary_lr as ul


class ProjunnStep:
    params = ([256, 1024], [1, 8], ["tangent", "direct"])
    param_names = ["n", "rank", "variant"]

    def setup(self, n, rank, variant):
        rng = np.random.default_rng(0)
        self.W = ul.random_unitary(n, dtype="float64", rng=rng)
        self.G = rng.standard_normal((n, n))

    def time_step(self, n, rank, variant):
        ul.projunn_step(self.W, self.G, lr=1e-2, rank=rank, variant=variant, rng=0)

    def track_unitarity_after_100_steps(self, n, rank, variant):
        W = self.W
        rng = np.random.default_rng(1)
        for _ in range(100):
            W = ul.projunn_step(W, self.G, lr=1e-2, rank=rank, variant=variant, rng=rng)
        return float(ul.unitarity_error(W))

    track_unitarity_after_100_steps.unit = "||W^H W - I||_F / sqrt(n)"
