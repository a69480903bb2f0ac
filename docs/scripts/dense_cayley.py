"""The dense Cayley step of full-capacity unitary RNNs against the low-rank
Cayley step, several timed steps of each, interleaved.

``unitary-lr bench`` times the dense O(n^3) steps (``--dense-max``) together
with the dense SVD polar and expm steps, which at n = 4096 take minutes each;
this times only the two Cayley steps: one dense step (``bench``'s own, a
solve with ``I + lr/2 A``), then five low-rank steps (``projunn_step(...,
variant="cayley", rank=1)``), three times over, on the same W and G as
``bench`` (NumPy, float64, one BLAS thread)::

    python docs/scripts/dense_cayley.py            # n = 4096
    python docs/scripts/dense_cayley.py 2048
"""

import datetime
import functools
import statistics
import sys
import time

import array_api_compat.numpy as xp
import numpy as np
from threadpoolctl import threadpool_limits

from unitary_lr import _benchdata as data
from unitary_lr import projunn_step, unitarity_error
from unitary_lr.cli import bench


def main(n):
    rng = np.random.default_rng([0, n])
    W = data.unitary(rng, n, False)
    G = data.gaussian(rng, (n, n), False, scale=n**-0.5)
    dense = bench._dense_cayley(xp, None, W, G)
    lowrank = functools.partial(projunn_step, W, G, lr=bench.LEARNING_RATE, rank=1, variant="cayley",
                                rng=np.random.default_rng(1))
    lowrank()
    dense_s, lowrank_s = [], []
    for _ in range(3):
        start = time.perf_counter()
        result = dense()
        dense_s.append(time.perf_counter() - start)
        for _ in range(5):
            start = time.perf_counter()
            lowrank()
            lowrank_s.append(time.perf_counter() - start)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, n = {n}, NumPy {np.__version__}")
    print("dense Cayley step [s]:", ", ".join(f"{t:.2f}" for t in dense_s),
          f"(unitarity error {float(unitarity_error(result)):.1e})")
    print(f"low-rank Cayley step, median of {len(lowrank_s)}: {1e3 * statistics.median(lowrank_s):.1f} ms")
    print(f"ratio of the medians: {statistics.median(dense_s) / statistics.median(lowrank_s):.0f}x")


if __name__ == "__main__":
    with threadpool_limits(1):
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
