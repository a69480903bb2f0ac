"""``projunn_step`` of two trees of the package, alternated call by call in
one process, at several ranks.

The hosts this project is measured on change speed within minutes, so a
before/after figure timed in two processes can mean little; alternating the
two trees' steps puts them under the same load (see ab_optimizer.py).

    git worktree add /tmp/old <revision>
    mkdir -p /tmp/oldpkg && cp -r /tmp/old/unitary_lr /tmp/oldpkg/unitary_lr_old
    python docs/scripts/ab_step.py /tmp/oldpkg torch float32 128 --ranks 1 2 8

(the old package under another name, so that both import side by side; its
imports are relative). One thread: torch's pool (``torch.set_num_threads``)
and NumPy's BLAS pool, through threadpoolctl (in the ``cli``, ``bench`` and
``test`` extras; the script stops with a message without it), for the rest
of the process. A Haar-random W and a Gaussian G; each
tree steps the same W along the same G with a generator of its own, seeded
alike. Prints the median of each tree's calls, in microseconds, and their
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("old", help="folder holding the old tree's package as unitary_lr_old")
    parser.add_argument("library", choices=("numpy", "torch"))
    parser.add_argument("dtype", choices=("float32", "float64", "complex64", "complex128"))
    parser.add_argument("n", type=int)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--variant", default="tangent", choices=("tangent", "cayley", "direct"))
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        parser.error("threadpoolctl limits NumPy's BLAS to one thread: pip install threadpoolctl")
    # not a `with` block: one thread for the whole process, as torch.set_num_threads below
    threadpool_limits(limits=1)

    sys.path.insert(0, args.old)
    import unitary_lr as new
    import unitary_lr_old as old

    rng = np.random.default_rng(0)
    complex_ = "complex" in args.dtype
    shape = (args.n, args.n)
    A = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_ else 0)
    W = np.linalg.qr(A)[0].astype(args.dtype)
    G = (rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_ else 0)).astype(args.dtype)
    if args.library == "torch":
        import torch

        torch.set_num_threads(1)
        W, G = torch.from_numpy(W), torch.from_numpy(G)
    for rank in args.ranks:
        trees = {"old": (old, np.random.default_rng(1)), "new": (new, np.random.default_rng(1))}
        times = {name: [] for name in trees}
        for _ in range(10):
            for module, generator in trees.values():
                module.projunn_step(W, G, lr=1e-2, rank=rank, variant=args.variant, rng=generator)
        for _ in range(args.rounds):
            for name, (module, generator) in trees.items():
                start = time.perf_counter()
                module.projunn_step(W, G, lr=1e-2, rank=rank, variant=args.variant, rng=generator)
                times[name].append(time.perf_counter() - start)
        old_us, new_us = (statistics.median(times[name]) * 1e6 for name in ("old", "new"))
        print(f"{args.library} {args.dtype} n = {args.n}, rank {rank}: old {old_us:.0f} us, new {new_us:.0f} us, "
              f"new / old {new_us / old_us:.2f}")


if __name__ == "__main__":
    main()
