"""Seeded random draws (floor 2).

The Array API standard has no random number generator. Draws are made on the
host with NumPy in float64, rounded to the target precision there and moved to
the target device: the same seed gives the same numbers on every backend and
device, which is what keeps the replicas of a distributed job in sync. A step
draws O(n k) numbers, so the transfer is negligible.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from ._host import from_host
from ._xp import dtype_name, is_complex

__all__ = ["as_generator", "generator_from_state", "generator_state", "host_normal", "standard_normal"]


def as_generator(rng, *, own=False) -> np.random.Generator:
    """``rng`` as a NumPy Generator: None (fresh entropy), an int seed, or a
    Generator (used, and advanced, as is).

    For None, a call that draws once and lets the generator go gets the
    process's own fresh-entropy generator (:func:`_fresh`); a caller that
    keeps it (an optimizer's stream, saved in its state) asks for its
    ``own`` new one."""
    if rng is None:
        return np.random.default_rng() if own else _fresh()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"rng seed must be >= 0, got {rng!r}")
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be None, an int seed or a numpy.random.Generator, "
        f"got {type(rng).__name__}: {rng!r}"
    )


class _Fresh:
    """One generator per process, seeded from fresh entropy when first asked
    (and again in a forked child, which must not repeat its parent's draws):
    ``default_rng()`` reads the OS entropy pool, 10-40 us, on every call
    with ``rng=None``."""

    pid = None
    generator = None


def _fresh() -> np.random.Generator:
    if _Fresh.pid != os.getpid():
        _Fresh.generator, _Fresh.pid = np.random.default_rng(), os.getpid()
    return _Fresh.generator


def standard_normal(xp, shape, *, dtype, device, rng):
    """Standard Gaussian array of ``shape`` in namespace ``xp``.

    Complex dtypes get circular complex Gaussians, (x + i y)/sqrt(2) with x, y
    independent real Gaussians, so E|z|^2 = 1.
    """
    # Rounded on the host: a device without float64 never sees a float64 array.
    return from_host(xp, host_normal(xp, shape, dtype=dtype, rng=rng), dtype=dtype, device=device)


def host_normal(xp, shape, *, dtype, rng) -> np.ndarray:
    """The NumPy array :func:`standard_normal` moves to the device: drawn in
    float64 (complex128) and rounded to ``dtype`` on the host. For callers
    that must draw in one order and move the draws later."""
    name = dtype_name(xp, dtype)
    return _host_normal(as_generator(rng), tuple(shape), name, is_complex(xp, dtype)).astype(name)


def _host_normal(gen, shape, name, complex_):
    """The float64 (complex128) host draw behind :func:`standard_normal`."""
    if complex_:
        parts = gen.standard_normal((2, *shape))
        return (parts[0] + 1j * parts[1]) * np.sqrt(0.5)
    return gen.standard_normal(shape)


def generator_state(gen: np.random.Generator) -> dict:
    """The state of a PCG64 generator as a dict of Python ints: it survives
    pickling, ``torch.save`` and ``torch.optim.Optimizer.load_state_dict`` (which
    mangles strings nested in optimizer state)."""
    state = gen.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise TypeError(f"only PCG64 generators can be saved, got {state['bit_generator']}")
    return {"state": state["state"]["state"], "inc": state["state"]["inc"],
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def generator_from_state(state: dict) -> np.random.Generator:
    """The generator saved by :func:`generator_state`."""
    bit_generator = np.random.PCG64(0)  # any seed: the state is replaced (no seed would read the OS entropy pool)
    bit_generator.state = {"bit_generator": "PCG64",
                           "state": {"state": int(state["state"]), "inc": int(state["inc"])},
                           "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}
    return np.random.Generator(bit_generator)
