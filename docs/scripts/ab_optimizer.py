"""``unitary_lr.torch.ProjUNN.step()`` of two trees of the package, and
``torch.optim``'s own step, alternated in one process.

The host this project is measured on changes speed by up to 2x within
minutes, so a before/after figure timed in two processes can mean nothing;
alternating the three steps call by call puts them under the same load.

    git worktree add /tmp/old <revision>
    mkdir -p /tmp/oldpkg && cp -r /tmp/old/unitary_lr /tmp/oldpkg/unitary_lr_old
    python docs/scripts/ab_optimizer.py /tmp/oldpkg 512 rmsprop float32 300

(the old package under another name, so that both import side by side; its
imports are relative). Prints the 20th percentile and the median of each,
in microseconds, and the ratios of the two trees' steps to torch.optim's.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("old", help="folder holding the old tree's package as unitary_lr_old")
    parser.add_argument("n", type=int)
    parser.add_argument("base", choices=("rmsprop", "adam", "sgd"))
    parser.add_argument("dtype", nargs="?", default="float32", choices=("float32", "float64", "complex64", "complex128"))
    parser.add_argument("rounds", nargs="?", type=int, default=200)
    parser.add_argument("--rank", type=int, default=1)
    args = parser.parse_args()

    sys.path.insert(0, args.old)
    torch.set_num_threads(1)
    import unitary_lr.torch as new
    import unitary_lr_old.torch as old

    dtype = getattr(torch, args.dtype)

    def projunn(module):
        W = torch.nn.Parameter(torch.linalg.qr(torch.randn(args.n, args.n, dtype=dtype))[0].contiguous())
        W.grad = torch.randn(args.n, args.n, dtype=dtype)
        return module.ProjUNN([{"params": [W], "unitary": True}], lr=1e-4, base=args.base, seed=0, rank=args.rank)

    plain = torch.nn.Parameter(torch.randn(args.n, args.n, dtype=dtype))
    plain.grad = torch.randn(args.n, args.n, dtype=dtype)
    reference = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[args.base]
    optimizers = {"old": projunn(old), "new": projunn(new), "torch.optim": reference([plain], lr=1e-4)}
    times = {name: [] for name in optimizers}
    for optimizer in optimizers.values():
        for _ in range(10):
            optimizer.step()
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    low = {}
    for name, values in times.items():
        values.sort()
        low[name] = values[len(values) // 5]
        print(f"{name}: 20th percentile {low[name] * 1e6:.0f} us, median {values[len(values) // 2] * 1e6:.0f} us")
    print(f"new / torch.optim {low['new'] / low['torch.optim']:.2f}, old / torch.optim {low['old'] / low['torch.optim']:.2f}")


if __name__ == "__main__":
    main()
