"""Calls from several threads at once. Python's warning filters are one list
for the whole process, and ``warnings.catch_warnings`` swaps it in and out:
threads whose calls entered and left out of order left a filter behind
(``ignore`` RuntimeWarning after batched steps, ``error`` RuntimeWarning
after the framework-free optimizer's Adam steps), which silenced the
caller's own warnings, or made them raise, for the rest of the process.
NumPy's floating-point error state, which the kernels use instead, is the
thread's own."""

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _helpers import haar, random_matrix, unitarity

import unitary_lr as ul
from unitary_lr.optim import ProjUNN


def _batched_steps(seed):
    rng = np.random.default_rng(seed)
    W = haar(rng, 12, "float64", (2,))
    for _ in range(20):
        W = ul.projunn_step(W, random_matrix(rng, W.shape, "float64"), lr=1e-2, rank=2, rng=seed)
    return W


def _optimizer_steps(seed):
    rng = np.random.default_rng(seed)
    W, opt = haar(rng, 64, "float64"), ProjUNN(1e-2, base="adam", rank=2, seed=seed)
    for _ in range(10):
        W = opt.step(W, random_matrix(rng, W.shape, "float64"))
    return W


def _sketches(seed):
    rng = np.random.default_rng(seed)
    return ul.randomized_svd(random_matrix(rng, (40, 30), "float64"), 3, rng=seed).S


@pytest.mark.parametrize("work", [_batched_steps, _optimizer_steps, _sketches])
def test_threads_leave_the_warning_filters_as_they_were(work):
    before = list(warnings.filters)
    alone = [work(seed) for seed in range(8)]
    for _ in range(5):
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(work, range(8)))
        assert warnings.filters == before
        for got, want in zip(together, alone):
            np.testing.assert_array_equal(got, want)
    if work is not _sketches:
        assert np.all(unitarity(np.stack(alone)) < 1e-13)


def test_no_call_swaps_the_warning_filters(monkeypatch):
    """The deterministic form of the test above: no kernel, and no step of
    the framework-free optimizer, NaN in G included, enters
    ``warnings.catch_warnings`` on NumPy arrays."""
    entered = []

    class Recording(warnings.catch_warnings):
        def __enter__(self):
            entered.append(True)
            return super().__enter__()

    monkeypatch.setattr(warnings, "catch_warnings", Recording)
    _batched_steps(0), _optimizer_steps(1), _sketches(2)
    rng = np.random.default_rng(3)
    W, G = haar(rng, 16, "float64"), random_matrix(rng, (16, 16), "float64")
    G[2, 3] = 1e300  # Adam's squares overflow: the rule's error names G
    with pytest.raises(ValueError, match="G"):
        ProjUNN(1e-2, base="adam").step(W, G)
    G[2, 3] = np.nan
    with pytest.raises(ValueError, match="G"):
        ul.projunn_step(W[None], G[None], lr=0.1, rng=0)
    assert entered == []
