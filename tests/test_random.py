"""Where the sketches' random numbers come from when no seed is given."""

import copy
import os

import numpy as np

import unitary_lr as ul
from unitary_lr import _random
from unitary_lr.optim import ProjUNN


def test_unseeded_steps_draw_new_sketches(rng):
    W = ul.random_unitary(12, dtype="float64", rng=0)
    G = rng.standard_normal((12, 12))
    first, second = (ul.projunn_step(W, G, lr=0.1, rank=2) for _ in range(2))
    assert not np.allclose(first, second)
    assert ul.unitarity_error(first) < 1e-13 and ul.unitarity_error(second) < 1e-13


def test_a_forked_child_does_not_repeat_its_parents_draws(monkeypatch):
    """The process's fresh-entropy generator is made anew in a forked child
    (a data-loader worker, a multiprocessing pool), which the library tells
    by its process id: copying the parent's state would make both draw the
    same sketches. (A real fork is not made here: the test process runs
    JAX's and torch's threads.)"""
    parent = _random.as_generator(None)
    parent_state = copy.deepcopy(parent.bit_generator.state)
    child_pid = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: child_pid)
    child = _random.as_generator(None)
    assert child is not parent
    continued = np.random.Generator(np.random.PCG64())
    continued.bit_generator.state = parent_state
    assert not np.array_equal(child.standard_normal(4), continued.standard_normal(4))
    assert _random.as_generator(None) is child  # and kept for the child's later draws


def test_an_unseeded_optimizer_owns_its_stream(rng):
    """Optimizers keep (and save) their generator: without a seed each gets its
    own, never the one the unseeded functions share, so stepping one
    optimizer, or calling projunn_step, does not move another's stream."""
    first, second = ProjUNN(0.1, rank=2), ProjUNN(0.1, rank=2)
    shared = _random.as_generator(None)
    assert first._rng is not second._rng
    assert shared not in (first._rng, second._rng)
    saved = first.state_dict()
    W = ul.random_unitary(8, dtype="float64", rng=0)
    G = rng.standard_normal((8, 8))
    second.step(W, G)
    ul.projunn_step(W, G, lr=0.1, rank=2)
    assert first.state_dict() == saved
