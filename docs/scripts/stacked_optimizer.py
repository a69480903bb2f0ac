"""``unitary_lr.torch.ProjUNN.step()`` on P unitary parameters of one shape:
stepped one by one (``foreach=False``) against one batched step
(``foreach=True``), alternated call by call in one process, with the host
transfers of each (on a GPU each is a stream synchronisation). With
``--frontend optim``, the same for the framework-free
``unitary_lr.optim.ProjUNN.step_many`` on NumPy arrays (CuPy arrays with
``--device cuda``).

    python docs/scripts/stacked_optimizer.py --device cpu --sizes 64 128 256 512 --counts 2 8 --ranks 1 8
    python docs/scripts/stacked_optimizer.py --frontend optim --sizes 64 128 256 512 --counts 2 8 --ranks 1 8

Prints, per case, the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unitary_lr import _benchdata, _host
from unitary_lr.torch import ProjUNN


def _unitary(rng, n, dtype):
    """A dense unitary (orthogonal) n x n NumPy matrix in O(n^2) (reflections
    and phases, as the bench's): a QR of a Gaussian took minutes at n = 16384."""
    return _benchdata.unitary(rng, n, dtype.startswith("complex")).astype(dtype)


def _optimizer(n, count, rank, foreach, dtype, device):
    """A step of the torch optimizer on ``count`` parameters, as a function."""
    import numpy as np

    rng = np.random.default_rng(0)
    params = []
    for _ in range(count):
        W = torch.nn.Parameter(torch.as_tensor(_unitary(rng, n, dtype)).to(device))
        W.grad = torch.as_tensor(_benchdata.gaussian(rng, (n, n), dtype.startswith("complex")).astype(dtype)).to(device)
        params.append(W)
    opt = ProjUNN([{"params": params, "unitary": True}], lr=1e-4, base="rmsprop", rank=rank, seed=0,
                  drift_check_every=0, foreach=foreach)
    return opt.step


def _framework_free(n, count, rank, foreach, dtype, device):
    """A ``step_many`` of the framework-free optimizer on ``count`` NumPy (or,
    on a GPU, CuPy) matrices, as a function."""
    import numpy as np

    from unitary_lr import optim

    if device.startswith("cuda"):
        import cupy as xp
    else:
        xp = np
    rng = np.random.default_rng(0)
    Ws = {p: xp.asarray(_unitary(rng, n, dtype)) for p in range(count)}
    Gs = {p: xp.asarray(rng.standard_normal((n, n)).astype(dtype)) for p in range(count)}
    opt = optim.ProjUNN(1e-4, base="rmsprop", rank=rank, seed=0, drift_check_every=0, foreach=foreach)

    def step():
        Ws.update(opt.step_many({p: (W, Gs[p]) for p, W in Ws.items()}))

    return step


def _synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        try:
            import cupy
        except ImportError:
            return
        cupy.cuda.Device().synchronize()


def _timed(step, device):
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--frontend", default="torch", choices=("torch", "optim"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "complex64", "complex128"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make = _optimizer if args.frontend == "torch" else _framework_free
    print(f"{'n':>5} {'P':>3} {'k':>3} {'separate [ms]':>14} {'stacked [ms]':>13} {'ratio':>6} {'transfers':>10}")
    for n in args.sizes:
        for count in args.counts:
            for rank in args.ranks:
                runs = {flag: make(n, count, rank, flag, args.dtype, args.device) for flag in (False, True)}
                transfers = {}
                for flag, step in runs.items():
                    step()
                    before = _host.transfers.count
                    step()
                    transfers[flag] = _host.transfers.count - before
                times = {flag: [] for flag in runs}
                for _ in range(args.rounds):
                    for flag, step in runs.items():
                        times[flag].append(_timed(step, args.device))
                separate, stacked = (statistics.median(times[flag]) * 1e3 for flag in (False, True))
                print(f"{n:5d} {count:3d} {rank:3d} {separate:14.2f} {stacked:13.2f} {separate / stacked:6.2f} "
                      f"{transfers[False]:>4d} -> {transfers[True]}")


if __name__ == "__main__":
    main()
