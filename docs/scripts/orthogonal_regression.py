"""Learn a random orthogonal (or unitary) matrix with an orthogonal ``nn.Linear``.

The problem behind the table of ``docs/choosing-lr-and-rank.md``: a target
Haar-random Q (n x n), Gaussian inputs x (a fresh batch of ``--batch`` every
step, the same stream for every optimizer), the loss ``mean |layer(x) - Q x|^2``
(``torch.nn.functional.mse_loss``), and ``layer = nn.Linear(n, n)`` whose
weight is kept orthogonal, starting from the same Haar sample for every
optimizer. The figure reported is the expected loss over fresh x after the
last step, ``(||W - Q||_F^2 + ||bias||^2) / n``: about 2 at the start, free
of the noise of one batch.

Peers: ``torch.nn.utils.parametrizations.orthogonal`` (and geotorch, when
installed; real matrices only, so not with ``--complex``) with
``torch.optim.Adam`` at its defaults. Run with one thread and a
fixed seed, every figure repeats exactly::

    python docs/scripts/orthogonal_regression.py                # the defaults against the peers
    python docs/scripts/orthogonal_regression.py --grid         # lr x rank for ProjUNN
    python docs/scripts/orthogonal_regression.py --n 64 --complex
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn

from unitary_lr import random_unitary
from unitary_lr.torch import ProjUNN, orthogonal


def problem(n, *, complex_=False, seed=0):
    """The target Q and the first weight W0, float32 or complex64."""
    dtype = "complex64" if complex_ else "float32"
    Q = random_unitary(n, dtype=dtype, rng=seed, xp=torch)
    W0 = random_unitary(n, dtype=dtype, rng=seed + 1, xp=torch)
    return Q, W0


def batches(n, batch, steps, *, complex_=False, seed=0):
    generator = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        if complex_:
            parts = torch.randn((2, batch, n), generator=generator) / 2**0.5
            yield torch.complex(parts[0], parts[1])
        else:
            yield torch.randn((batch, n), generator=generator)


def layer(W0):
    """nn.Linear(n, n) with its weight set to W0 (its bias as torch draws it)."""
    torch.manual_seed(0)
    n = W0.shape[0]
    linear = nn.Linear(n, n, dtype=W0.dtype)
    with torch.no_grad():
        linear.weight.copy_(W0)
    return linear


def expected_loss(linear, Q):
    """E |W x + b - Q x|^2 / n over x ~ N(0, I)."""
    with torch.no_grad():
        W = linear.weight.detach()
        n = Q.shape[0]
        return float((torch.linalg.matrix_norm(W - Q) ** 2 + torch.linalg.vector_norm(linear.bias) ** 2) / n)


def train(linear, optimizer, Q, *, batch=64, steps=200, seed=0):
    n = Q.shape[0]
    complex_ = Q.is_complex()
    for x in batches(n, batch, steps, complex_=complex_, seed=seed):
        target = x @ Q.T
        loss = (linear(x) - target).abs().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return expected_loss(linear, Q)


def run_projunn(n, *, complex_=False, seed=0, batch=64, steps=200, **options):
    """ProjUNN(model.parameters(), **options) on the weight made orthogonal by
    ``unitary_lr.torch.orthogonal``; returns the final expected loss."""
    Q, W0 = problem(n, complex_=complex_, seed=seed)
    linear = orthogonal(layer(W0))
    optimizer = ProjUNN(linear.parameters(), seed=seed, **options)
    return train(linear, optimizer, Q, batch=batch, steps=steps, seed=seed)


def run_torch(n, *, complex_=False, seed=0, batch=64, steps=200, lr=1e-3):
    """torch's orthogonal parametrization (matrix_exp) with Adam(lr)."""
    Q, W0 = problem(n, complex_=complex_, seed=seed)
    linear = layer(W0)
    torch.nn.utils.parametrizations.orthogonal(linear, "weight")
    linear.weight = W0  # through right_inverse: the same first weight
    return train(linear, torch.optim.Adam(linear.parameters(), lr=lr), Q, batch=batch, steps=steps, seed=seed)


def run_geotorch(n, *, complex_=False, seed=0, batch=64, steps=200, lr=1e-3):
    import geotorch

    Q, W0 = problem(n, complex_=complex_, seed=seed)
    linear = layer(W0)
    geotorch.orthogonal(linear, "weight")
    linear.weight = W0
    return train(linear, torch.optim.Adam(linear.parameters(), lr=lr), Q, batch=batch, steps=steps, seed=seed)


def _timed(label, function, **kwargs):
    start = time.perf_counter()
    loss = function(**kwargs)
    print(f"{label:<48} {loss:10.3g}   ({time.perf_counter() - start:.1f} s)", flush=True)
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--complex", action="store_true", help="complex64: a unitary Q")
    parser.add_argument("--grid", action="store_true", help="ProjUNN over --lrs x --ranks")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--base", default=None, help="ProjUNN's base rule (default: ProjUNN's default)")
    parser.add_argument("--no-peers", action="store_true", help="skip torch's parametrization")
    parser.add_argument("--geotorch", action="store_true", help="also geotorch.orthogonal + Adam()")
    args = parser.parse_args(argv)
    if args.complex and args.geotorch:  # geotorch's orthogonal fails deep inside on a complex weight
        parser.exit(2, f"{parser.prog}: error: --geotorch takes real matrices only: drop --complex or --geotorch\n")
    torch.set_num_threads(1)
    common = {"n": args.n, "complex_": args.complex, "seed": args.seed, "batch": args.batch, "steps": args.steps}
    base = {} if args.base is None else {"base": args.base}
    print(f"n = {args.n}, {'complex64' if args.complex else 'float32'}, batch {args.batch}, {args.steps} steps, "
          f"seed {args.seed}: expected loss after the last step (start: about 2)")
    if not args.no_peers:
        _timed("torch orthogonal + Adam()", run_torch, **common)
    if args.geotorch:
        _timed("geotorch.orthogonal + Adam()", run_geotorch, **common)
    _timed(f"ProjUNN(model.parameters(){', ' + repr(base) if base else ''})", run_projunn, **common, **base)
    if args.grid:
        for rank, lr in itertools.product(args.ranks, args.lrs):
            _timed(f"ProjUNN(lr={lr:g}, rank={rank}{', base=' + args.base if args.base else ''})",
                   run_projunn, **common, lr=lr, rank=rank, **base)


if __name__ == "__main__":
    main()
