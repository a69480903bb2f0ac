"""Where a step's time goes, on the device that runs it: host time against
wall time, kernels, copies and host waits per step, the GPU's own busy time
and its largest kernels; and the product forms of the step's thin panels.

    python docs/scripts/step_profile.py [--device cuda] [--sizes 1024 4096] [--steps 20]

For each size it times, with ``torch.profiler`` around ``--steps`` steps
after a warm-up: an eager ``projunn_step`` (rank 1, tangent), an eager
``ProjUNN(base="rmsprop").step``, ``torch.optim.RMSprop.step`` on the same
parameter, and on CUDA the last two captured in one CUDA graph each and
replayed. Per step it prints:

- ``wall``: the median time of a step, device-synchronised;
- ``host``: the median time until the call returns, not synchronised (the
  Python and launch cost; a step whose host time is its wall time is bound
  by the host, not by the GPU);
- ``kernels``, ``copies``, ``waits``: launches, memory copies and host
  synchronisations (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
  synchronous ``cudaMemcpy``) that the profiler saw, per step;
- ``busy``: the sum of the GPU's kernel times per step; ``wall - busy`` is
  time the GPU waited for the host.

Then the ``top`` kernels (or, on the CPU, aten operators) by their time, and
the product forms of a large A (n x n) with a thin panel P (n x 1, n x 2, n x 11) as
``_xp.matmul_panel`` and ``_xp.adjoint_matmul`` write them for PyTorch,
against the plain products, so that a GPU run shows whether the forms chosen
on the CPU (MKL) also suit cuBLAS.

On the CPU (``--device cpu``, a dry run of the plumbing) the same tables come
out, with aten operators for kernels and no capture.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import unitary_lr
from unitary_lr.torch import ProjUNN

_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
_COPIES = ("cudaMemcpyAsync", "cudaMemcpy")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, step, steps):
    """(median wall seconds, median host seconds) of ``steps`` calls."""
    wall, host = [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        returned = time.perf_counter()
        _sync(device)
        wall.append(time.perf_counter() - start)
        host.append(returned - start)
    return statistics.median(wall), statistics.median(host)


def _profiled(device, step, steps, top):
    """Per step: kernels, copies, waits, GPU busy seconds, and the ``top``
    kernels (aten operators on the CPU) as (name, microseconds per step)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    kernels = copies = waits = 0
    busy, by_name = 0.0, {}
    for event in prof.events():
        name = event.name
        if device.type == "cuda":
            if event.device_type == torch.autograd.DeviceType.CUDA:
                duration = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
                busy += duration
                by_name[name] = by_name.get(name, 0.0) + duration
            elif name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch"):
                kernels += 1
            if name in _COPIES:
                copies += 1
            if name in _WAITS:
                waits += 1
        elif name.startswith("aten::") and not (event.cpu_parent is not None and
                                                 event.cpu_parent.name.startswith("aten::")):
            kernels += 1  # an operator that no other operator called
            by_name[name] = by_name.get(name, 0.0) + event.cpu_time_total
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return kernels / steps, copies / steps, waits / steps, busy / steps * 1e-6, \
        [(name, micros / steps) for name, micros in ranked]


def _captured(device, make, param, grad):
    """``make(param)``'s step captured in one CUDA graph (PyTorch's recipe:
    a static gradient, warm-up on a side stream); the replay."""
    opt = make(param)
    param.grad = grad.clone()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def _cases(device, n, dtype, seed):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=generator))[0].contiguous().to(device)
    G = torch.randn(n, n, dtype=dtype, generator=generator).to(device)

    def parameter():
        p = torch.nn.Parameter(W.clone())
        p.grad = G.clone()
        return p

    def projunn(p, capturable=False):
        return ProjUNN([{"params": [p], "unitary": True}], lr=1e-3, base="rmsprop", rank=1, seed=seed,
                       capturable=capturable)

    cases = [("projunn_step (T, k = 1)", lambda: unitary_lr.projunn_step(W, G, lr=1e-3, rank=1, rng=seed))]
    opt = projunn(parameter())
    cases.append(("ProjUNN(rmsprop).step", opt.step))
    rms = torch.optim.RMSprop([parameter()], lr=1e-3)
    cases.append(("torch.optim.RMSprop.step", rms.step))
    if device.type == "cuda":
        cases.append(("ProjUNN(rmsprop), captured",
                      _captured(device, lambda p: projunn(p, capturable=True), parameter(), G)))
        cases.append(("RMSprop, captured",
                      _captured(device, lambda p: torch.optim.RMSprop([p], lr=1e-3, capturable=True), parameter(), G)))
    return W, cases


def _forms(device, W, steps):
    """(name, microseconds) of the thin products in the forms the library
    writes for PyTorch and in the plain forms."""
    n = W.shape[-1]
    y = torch.randn(n, 1, dtype=W.dtype, device=device)
    P = torch.randn(2, n, dtype=W.dtype, device=device).mT  # column by column, as the step's panels
    # the randomized SVD's sketch at rank 1 (11 columns), where the CPU takes the
    # plain form for real tensors (_xp._TORCH_CPU_DIRECT_ROW_BYTES) and CUDA the transposed one
    P11 = torch.randn(11, n, dtype=W.dtype, device=device).mT
    forms = [
        ("A @ P, P n x 2 (plain)", lambda: W @ P),
        ("(P^T A^T)^T, P n x 2 (matmul_panel)", lambda: (P.mT @ W.mT).mT),
        ("A @ y, y n x 1", lambda: W @ y),
        ("A^T @ y (plain)", lambda: W.mT @ y),
        ("(y^T A)^T (adjoint_matmul)", lambda: (y.mT @ W).mT),
        ("A^T @ P, P n x 2 (plain)", lambda: W.mT @ P),
        ("(P^T A)^T, P n x 2 (adjoint_matmul)", lambda: (P.mT @ W).mT),
        ("A @ P, P n x 11 (plain; the CPU's form)", lambda: W @ P11),
        ("(P^T A^T)^T, P n x 11 (matmul_panel on CUDA)", lambda: (P11.mT @ W.mT).mT),
        ("A^T @ P, P n x 11 (plain)", lambda: W.mT @ P11),
        ("(P^T A)^T, P n x 11 (adjoint_matmul)", lambda: (P11.mT @ W).mT),
    ]
    for _, run in forms:
        run()
    return [(name, _timed(device, run, steps)[0] * 1e6) for name, run in forms]


def main():
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "complex64", "complex128"))
    parser.add_argument("--steps", type=int, default=20, help="timed and profiled steps per case")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per case")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU's dry run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, unitary_lr {unitary_lr.__version__}, {device} ({name}), {args.dtype}, "
          f"{args.steps} steps per case; times per step")
    for n in args.sizes:
        W, cases = _cases(device, n, dtype, args.seed)
        print(f"\nn = {n}")
        print(f"{'case':>28} {'wall ms':>8} {'host ms':>8} {'kernels':>8} {'copies':>7} {'waits':>6} {'busy ms':>8}")
        tops = []
        for label, step in cases:
            for _ in range(3):
                step()
            wall, host = _timed(device, step, args.steps)
            kernels, copies, waits, busy, top = _profiled(device, step, args.steps, args.top)
            print(f"{label:>28} {wall * 1e3:8.3f} {host * 1e3:8.3f} {kernels:8.1f} {copies:7.1f} {waits:6.1f} "
                  f"{busy * 1e3:8.3f}")
            tops.append((label, top))
        for label, top in tops:
            print(f"  top of {label} (us per step): " + "; ".join(f"{us:.1f} {name[:60]}" for name, us in top))
        print("  thin products (us, synchronised median): " +
              "; ".join(f"{name} {us:.1f}" for name, us in _forms(device, W, args.steps)))


if __name__ == "__main__":
    main()
