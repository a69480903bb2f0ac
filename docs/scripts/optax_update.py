"""The jitted optax update against the floor under ``jax.jit``, rank 1.

``unitary-lr bench --backend jax`` times the same three things inside its
interleaved rounds; this times them in a hot loop, for comparing two trees
(run it from each, alternating)::

    python docs/scripts/optax_update.py
    PYTHONPATH=/path/to/other/checkout python docs/scripts/optax_update.py

Per dtype (float32, float64) and n (256, 1024): the median of 40 calls of the
floor ``(G @ x, W + u v^T)`` under ``jax.jit``, of ``jax.jit(update)`` of
``unitary_lr.optax.projunn(base="rmsprop")`` and of ``projunn_retraction``
alone, with the updates' ratios to the floor. Each update carries its
state from call to call, as a training loop does: the drift check then runs
once in ``drift_check_every`` (50) updates, and after the first, which the
untimed warm-up call takes. (Until 2026-12-07 every timed call got a fresh
state, so each was a first update and ran the check: 1.3-1.6x the steady
update's time.) One BLAS/XLA thread is the caller's choice (``taskset``, or
the machine).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import unitary_lr
from unitary_lr import random_unitary
from unitary_lr.optax import projunn, projunn_retraction

jax.config.update("jax_enable_x64", True)


def median_ms(function, *args, repeat=40):
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def carried(transform, params):
    """``transform``'s jitted update as a function of (grads, params) that
    keeps its state between calls."""
    update = jax.jit(transform.update)
    state = [transform.init(params)]

    def step(grads, params):
        updates, state[0] = update(grads, state[0], params)
        return updates

    return step


def main():
    print(f"unitary_lr from {unitary_lr.__file__}, jax {jax.__version__}")
    floor = jax.jit(lambda G, W, x, u, v: (G @ x, W + u @ v.T))
    for dtype in ("float32", "float64"):
        for n in (256, 1024):
            W = random_unitary(n, dtype=dtype, xp=jnp, rng=0)
            rng = np.random.default_rng(1)
            G, x, u, v = (jnp.asarray(rng.standard_normal(shape) * scale, dtype=W.dtype)
                          for shape, scale in (((n, n), n**-0.5), ((n,), 1.0), ((n, 2), 1.0), ((n, 2), 1.0)))
            params, grads = {"W": W}, {"W": G}
            chain = projunn(1e-2, unitary={"W": True}, rank=1)
            retraction = projunn_retraction(unitary={"W": True}, rank=1)
            base = median_ms(floor, G, W, x, u, v)
            full = median_ms(carried(chain, params), grads, params)
            alone = median_ms(carried(retraction, params), grads, params)
            print(f"{dtype} n={n}: floor {base:.3f} ms, projunn {full:.3f} ms ({full / base:.2f}x), "
                  f"retraction {alone:.3f} ms ({alone / base:.2f}x)")


if __name__ == "__main__":
    main()
