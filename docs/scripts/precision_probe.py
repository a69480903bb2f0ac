"""How the matrix-product precision of a GPU backend affects unitarity, and
how many host synchronisations one eager CUDA step makes.

    python docs/scripts/precision_probe.py [--device cuda] [--n 1024] [--steps 50]

JAX computes float32 products in TF32 on NVIDIA GPUs unless told otherwise
(``jax.default_matmul_precision``), and PyTorch does so after
``torch.set_float32_matmul_precision("high")``, a common setting in training
scripts. TF32 keeps 10 bits of the mantissa, so steps computed with it drift from
unitary where float32 steps stay within rounding. This script runs
``--steps`` float32 projUNN steps (each variant, rank 1 and 8) on Gaussian
gradients with each setting and prints the unitarity error after the first
step and after the last (computed on the host in float64), and what
``unitarity_error`` reads under the setting, then counts the host synchronisations of one eager
torch CUDA step (``torch.cuda.set_sync_debug_mode``). Runs on the CPU too (no
TF32 there: the rows must agree), to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np

import unitary_lr

VARIANTS = ("tangent", "direct", "cayley")
RANKS = (1, 8)


def _host_error(W):
    """The unitarity error of W computed on the host in float64, whatever the
    backend's own product precision (a TF32 check would read 3e-4 for an
    exactly unitary float32 W)."""
    if hasattr(W, "detach"):
        W = W.detach().cpu()
    W = np.asarray(W).astype(np.complex128)
    n = W.shape[-1]
    return float(np.linalg.norm(W.conj().T @ W - np.eye(n)) / np.sqrt(n))


def _runs(args, xp, device, settings, dtype):
    for label, setting in settings:
        for variant in VARIANTS:
            for rank in RANKS:
                rng = np.random.default_rng([args.seed, rank])
                W = unitary_lr.random_unitary(args.n, dtype=dtype, rng=rng, xp=xp, device=device)
                first = None
                start = time.perf_counter()
                with setting():
                    for step in range(args.steps):
                        G = xp.asarray(rng.standard_normal((args.n, args.n)).astype("float32") / args.n**0.5,
                                       device=device)
                        W = unitary_lr.projunn_step(W, G, lr=args.lr, rank=rank, variant=variant, rng=rng)
                        if step == 0:
                            first = _host_error(W)
                    checked = float(unitary_lr.unitarity_error(W))
                last = _host_error(W)
                seconds = time.perf_counter() - start
                print(f"{label:34s} {variant:8s} k={rank}  after 1: {first:8.1e}  after {args.steps}: {last:8.1e}"
                      f"  (unitarity_error under the setting: {checked:8.1e}; {seconds:.1f} s)", flush=True)


def torch_rows(args):
    import torch

    device = torch.device(args.device)

    def precision(level):
        @contextlib.contextmanager
        def setting():
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(level)
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(old)
        return setting

    _runs(args, torch, device, [(f"torch float32_matmul_precision={level}", precision(level))
                                for level in ("highest", "high")], "float32")
    if device.type != "cuda":
        return
    for variant in VARIANTS:
        for rank in RANKS:
            rng = np.random.default_rng([args.seed, rank, 1])
            W = unitary_lr.random_unitary(args.n, dtype="float32", rng=rng, xp=torch, device=device)
            G = torch.randn(args.n, args.n, device=device) / args.n**0.5
            unitary_lr.projunn_step(W, G, lr=args.lr, rank=rank, variant=variant, rng=rng)  # warm
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    unitary_lr.projunn_step(W, G, lr=args.lr, rank=rank, variant=variant, rng=rng)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            print(f"torch cuda eager step {variant:8s} k={rank}: {len(syncs)} host synchronisations"
                  + "".join(f"\n    {s}" for s in syncs[:4]), flush=True)


def jax_rows(args):
    import jax

    device = jax.devices("gpu" if args.device != "cpu" else "cpu")[0]

    def precision(level):
        return (lambda: contextlib.nullcontext()) if level is None else (lambda: jax.default_matmul_precision(level))

    with jax.default_device(device):
        _runs(args, jax.numpy, device, [(f"jax default_matmul_precision={level}", precision(level))
                                        for level in (None, "highest")], "float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"])
    args = parser.parse_args()
    for backend in args.backends:
        try:
            {"torch": torch_rows, "jax": jax_rows}[backend](args)
        except Exception as error:  # noqa: BLE001 - a report: the other backend still runs
            print(f"{backend}: failed: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    main()
