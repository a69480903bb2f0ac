"""Householder products and HTA adapters.

``householder_apply`` (compact WY form, O(j n m)) against multiplying by the
dense product P (O(n^2 m), P formed beforehand and not timed), and the
forward + backward pass of a ``HouseholderAdapter`` against a LoRA adapter of
rank 8, an ``SVDAdapter`` of rank 8 and PEFT's HRA on the same frozen layer.
The targets (float32, one CPU thread): HTA with 1 and 8 reflectors a side at
most 2x LoRA r = 8 and at least 15x faster than HRA with as many reflections;
``householder_apply`` with j = 32 at most 3x the dense 1024 x 1024 x 64 product.

``python -m benchmarks.householder`` (from ``asv_benchmarks/``) prints the
adapters' medians and the ratios of one interleaved run, as recorded in the
docs.
"""

import gc
import statistics
import sys
import time
import warnings

import numpy as np

from unitary_lr import householder_apply, householder_product

from ._support import BACKENDS, TIMEOUT, block, host_gaussian, load, to_device

COLUMNS = 64  # m: a batch of 64 vectors
# The adapters on a 768 x 768 layer; HRA (PEFT) is skipped where PEFT is not installed.
ADAPTERS = ["HTA j=1", "HTA j=8", "LoRA r=8", "SVD r=8", "HRA r=1", "HRA r=8", "HRA r=16"]


class HouseholderApply:
    """``householder_apply(V, X)`` with V (n, j) and X (n, 64), against ``P @ X``."""

    params = ([1024], [1, 8, 32], ["float32", "float64"], BACKENDS)
    param_names = ("n", "j", "dtype", "backend")
    timeout = TIMEOUT

    def setup(self, n, j, dtype, backend):
        self.backend = load(backend, dtype)
        rng = np.random.default_rng(0)
        self.V = to_device(self.backend, host_gaussian(rng, (n, j), dtype), dtype)
        self.X = to_device(self.backend, host_gaussian(rng, (n, COLUMNS), dtype), dtype)
        self.P = householder_product(self.V)
        block(self.backend, self.P)

    def time_householder_apply(self, n, j, dtype, backend):
        block(self.backend, householder_apply(self.V, self.X))

    def time_householder_apply_unchecked(self, n, j, dtype, backend):
        """Without the NaN/Inf check (what the adapters call)."""
        block(self.backend, householder_apply(self.V, self.X, check_finite=False))

    def time_dense_product(self, n, j, dtype, backend):
        block(self.backend, self.P @ self.X)


class AdapterForwardBackward:
    """One training step's forward + backward of a 768 x 768 frozen layer with an
    adapter, batch 64, float32, PyTorch on the CPU with one thread (so that the
    ratio of the adapters is steady on a shared machine)."""

    params = (ADAPTERS,)
    param_names = ("adapter",)
    timeout = TIMEOUT

    def setup(self, adapter):
        torch = _torch()
        self.torch = torch
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.module, self.x = _adapter(torch, adapter)

    def teardown(self, adapter):
        self.torch.set_num_threads(self.threads)

    def time_forward_backward(self, adapter):
        self.module.zero_grad(set_to_none=True)
        self.module(self.x).square().sum().backward()


class AdapterRatio:
    """HRA's forward + backward time over HTA's at the same number of
    reflections (j on each side for HTA, r = j for HRA), and HTA's over LoRA
    r = 8's: the median of the ratios of interleaved passes (each pair sees
    the same load from other processes), in thread CPU time, one thread.
    The targets: HRA / HTA >= 15, HTA / LoRA <= 2."""

    params = ([1, 8],)
    param_names = ("reflections",)
    timeout = TIMEOUT
    pairs = 15

    def setup(self, reflections):
        torch = _torch()
        self.torch, self.threads = torch, torch.get_num_threads()
        torch.set_num_threads(1)
        self.passes = {name: _adapter(torch, name) for name in
                       (f"HTA j={reflections}", f"HRA r={reflections}", "LoRA r=8")}
        for module, x in self.passes.values():  # warm up: first calls allocate
            _forward_backward(module, x)

    def teardown(self, reflections):
        self.torch.set_num_threads(self.threads)

    def _ratio(self, numerator, denominator):
        return _median_ratio(self.passes[numerator], self.passes[denominator], self.pairs)

    def track_hra_over_hta(self, reflections):
        return self._ratio(f"HRA r={reflections}", f"HTA j={reflections}")

    track_hra_over_hta.unit = "HRA time / HTA time"

    def track_hta_over_lora(self, reflections):
        return self._ratio(f"HTA j={reflections}", "LoRA r=8")

    track_hta_over_lora.unit = "HTA time / LoRA r=8 time"


def _torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("PyTorch is not installed") from None
    return torch


def _adapter(torch, name, *, size=768, batch=64):
    """(module, x): a frozen ``size`` x ``size`` float32 nn.Linear with the
    adapter ``name`` ("HTA j=…", "LoRA r=…", "SVD r=…", "HRA r=…"), and a batch."""
    from unitary_lr.torch import HouseholderAdapter, SVDAdapter

    kind, value = name.split(" ")
    value = int(value.split("=")[1])
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = torch.nn.Linear(size, size)
    if kind == "HTA":
        module = HouseholderAdapter(layer, reflectors=value, generator=generator)
    elif kind == "SVD":
        module = SVDAdapter(layer, rank=value, generator=generator)
    elif kind == "LoRA":
        module = _lora(torch, layer, rank=value, generator=generator)
    else:
        module = _hra(torch, layer, reflections=value)
    with torch.no_grad():  # a trained adapter: sigma, s, B nonzero (no cost difference, but no special case)
        for parameter_name, parameter in module.named_parameters():
            if parameter.requires_grad and parameter_name.rsplit(".", 1)[-1] in ("sigma", "s", "B"):
                parameter.normal_(generator=generator)
    return module, torch.randn(batch, size, generator=generator)


def _hra(torch, layer, *, reflections):
    """PEFT's HRA layer (``peft.HRAConfig(r=reflections)``) around ``layer``,
    called directly rather than through the PeftModel wrapper."""
    try:
        import peft
    except ImportError:
        raise NotImplementedError("PEFT is not installed") from None
    with warnings.catch_warnings():  # an odd r: "the symmetric initialization can NOT be performed"
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch.nn.Sequential(layer), peft.HRAConfig(r=reflections, target_modules=["0"]))
    return model.base_model.model[0]


def _forward_backward(module, x):
    module.zero_grad(set_to_none=True)
    module(x).square().sum().backward()


def _timed(module, x):
    """Thread CPU time of one forward + backward without garbage collection,
    after an untimed one: the pass that directly follows another adapter's
    (HRA's 768 x 768 products above all) costs up to 0.8 ms more, whichever
    adapter it is, and the comparison is of a layer's steady cost."""
    _forward_backward(module, x)
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection (about 10 ms here, with PEFT loaded) falls on whichever pass crosses its threshold
    try:
        start = time.thread_time()
        _forward_backward(module, x)
        return time.thread_time() - start
    finally:
        if collecting:
            gc.enable()


def _median_ratio(numerator, denominator, pairs):
    ratios = []
    for i in range(pairs):
        if i % 2:  # alternate who goes first: neither gets the warmer cache every time
            top, bottom = _timed(*numerator), _timed(*denominator)
        else:
            bottom, top = _timed(*denominator), _timed(*numerator)
        ratios.append(top / bottom)
    return statistics.median(ratios)


def _report(repeat=21):
    """Medians (thread CPU time, interleaved rounds) of every adapter's
    forward + backward, and the targets' ratios, for the docs."""
    import torch

    torch.set_num_threads(1)
    passes = {}
    for name in ADAPTERS:
        try:
            passes[name] = _adapter(torch, name)
        except NotImplementedError as error:
            print(f"{name}: skipped ({error})")
    for pair in passes.values():
        _forward_backward(*pair)
    times = {name: [] for name in passes}
    names = list(passes)
    for round_ in range(repeat):  # round-robin: a burst of load falls on every adapter alike,
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each first in turn
            times[name].append(_timed(*passes[name]))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}, one thread, 768 x 768 float32, batch 64, median of {repeat} forward + backward")
    for name, value in median.items():
        print(f"{name:10s} {1e3 * value:9.3f} ms  {value / median['LoRA r=8']:7.2f}x LoRA r=8")
    for j in (1, 8):
        print(f"HTA j={j} / LoRA r=8: paired ratio "
              f"{_median_ratio(passes[f'HTA j={j}'], passes['LoRA r=8'], repeat):.2f}x")
        if f"HRA r={j}" in median:
            print(f"HRA r={j} / HTA j={j}: {median[f'HRA r={j}'] / median[f'HTA j={j}']:.1f}x; "
                  f"paired ratio {_median_ratio(passes[f'HRA r={j}'], passes[f'HTA j={j}'], repeat):.1f}x")
        if f"HRA r={2 * j}" in median:  # HTA j reflects j times on each side: 2j in all
            print(f"HRA r={2 * j} / HTA j={j}: {median[f'HRA r={2 * j}'] / median[f'HTA j={j}']:.1f}x")


def _lora(torch, layer, *, rank, generator):
    """The plain low-rank adapter ``y = x W0^T + b + (x A^T) B^T`` (Hu et al.,
    2021) with A Gaussian and B zero at start, written here as the baseline."""

    class LoRA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = layer
            for parameter in layer.parameters():
                parameter.requires_grad_(False)
            self.A = torch.nn.Parameter(torch.randn(rank, layer.in_features, generator=generator)
                                        / layer.in_features**0.5)
            self.B = torch.nn.Parameter(torch.zeros(layer.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.A.T) @ self.B.T

    return LoRA()


if __name__ == "__main__":
    _report(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
