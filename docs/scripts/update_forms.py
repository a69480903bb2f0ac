"""The rank-r update ``W += L @ Rh`` as PyTorch runs it: one ``addmm_``
against one ``baddbmm_`` over blocks of 8 rows, and which form
``unitary_lr`` picks (``_xp.update_chunk_rows``).

    python docs/scripts/update_forms.py [--device cpu] [--threads 1] [--rounds 30]

On the CPU, MKL runs a float32 (and complex128) update of rank 2 to 8 several
times slower than a pass over W when W's rows lie a multiple of 2 KiB apart;
the blocked form runs at memory speed there, and ``unitary_lr`` uses it only
on the CPU. On a GPU the script shows whether cuBLAS has a like case. Times
each form in three batches of ``--rounds / 3`` runs, alternating with the
other form from batch to batch (device-synchronised), and prints per shape,
dtype and rank the smallest of its three batches' 20th percentiles, in
microseconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from unitary_lr._xp import row_blocks, update_chunk_rows

SHAPES = ((512, 512), (1000, 1000), (1024, 1024), (2048, 512), (4096, 256), (4096, 4096), (16384, 16384))


def _timed(device, run, rounds):
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 5] * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--max-entries", type=int, default=None,
                        help="skip shapes with more entries (default: 2^24 on the CPU, none on a GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    limit = args.max_entries or (1 << 24 if device.type == "cpu" else 1 << 30)
    print(f"torch {torch.__version__}, {device}, {args.threads} CPU thread(s); times in us "
          "(the smallest of 3 batches' 20th percentiles)")
    print(f"{'dtype':>10} {'n':>6} {'m':>6} {'r':>3} {'addmm_':>10} {'8-row blocks':>13} {'ratio':>6} {'used':>8}")
    for dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        for n, m in SHAPES:
            if n * m > limit:
                continue
            W = torch.randn(n, m, dtype=dtype, device=device)
            for r in (1, 2, 8):
                L = torch.randn(n, r, dtype=dtype, device=device) * 1e-6
                Rh = torch.randn(r, m, dtype=dtype, device=device)
                Wb, Lb, Rb = row_blocks(W, L, Rh, 8)
                forms = {"addmm": lambda: W.addmm_(L, Rh), "blocks": lambda: Wb.baddbmm_(Lb, Rb)}
                for run in forms.values():
                    run()
                times = {name: [] for name in forms}
                for _ in range(3):  # alternated, so that a change of load hits both
                    for name, run in forms.items():
                        times[name].append(_timed(device, run, max(1, args.rounds // 3)))
                plain, blocked = min(times["addmm"]), min(times["blocks"])
                used = "blocks" if update_chunk_rows(W, r) else "addmm"
                print(f"{str(dtype).rpartition('.')[2]:>10} {n:>6} {m:>6} {r:>3} {plain:>10.1f} {blocked:>13.1f} "
                      f"{plain / blocked:>6.2f} {used:>8}", flush=True)


if __name__ == "__main__":
    main()
