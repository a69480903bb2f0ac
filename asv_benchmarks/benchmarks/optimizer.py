"""``unitary_lr.torch.ProjUNN`` on plain (non-unitary) parameters against
``torch.optim`` with the same hyper-parameters.

A model handed whole to ProjUNN has most of its parameters in plain groups,
so their step must cost what torch.optim's does: ProjUNN steps them with
torch.optim's own functional RMSprop / Adam, plus one NaN/Inf check of the
gradients (a sum per gradient, one host read), which torch.optim does not
make. Four 2048 x 2048 float32 parameters, PyTorch on the CPU, one thread, so
that the ratio is steady on a shared machine.
"""

import statistics
import time

N = 2048
COUNT = 4
BASES = ["rmsprop", "adam"]


def _setup_torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("PyTorch is not installed") from None
    return torch


def _parameters(torch):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(N, N, generator=g)) for _ in range(COUNT)]
    for p in params:
        p.grad = torch.randn(N, N, generator=g)
    return params


def _optimizer(torch, name, base, params):
    # a small lr: the parameters barely move over the thousands of steps asv takes
    if name == "ProjUNN":
        from unitary_lr.torch import ProjUNN

        return ProjUNN(params, lr=1e-6, base=base, seed=0)
    return {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}[base](params, lr=1e-6)


class PlainParameterStep:
    """One ``step()`` of either optimizer over the same four parameters."""

    params = (BASES, ["ProjUNN", "torch.optim"])
    param_names = ("base", "optimizer")
    timeout = 300

    def setup(self, base, optimizer):
        torch = _setup_torch()
        self.torch, self.threads = torch, torch.get_num_threads()
        torch.set_num_threads(1)
        self.opt = _optimizer(torch, optimizer, base, _parameters(torch))
        self.opt.step()  # the state exists before timing starts

    def teardown(self, base, optimizer):
        self.torch.set_num_threads(self.threads)

    def time_step(self, base, optimizer):
        self.opt.step()


class PlainParameterRatio:
    """ProjUNN's step time over torch.optim's: the median of the ratios of
    alternating steps (each pair sees the same load from other processes),
    measured in thread CPU time. 1.0 is parity; the target is <= 1.1."""

    params = (BASES,)
    param_names = ("base",)
    timeout = 300
    pairs = 15

    def setup(self, base):
        torch = _setup_torch()
        self.torch, self.threads = torch, torch.get_num_threads()
        torch.set_num_threads(1)
        params = _parameters(torch)  # both step the same tensors: the same memory
        self.ours = _optimizer(torch, "ProjUNN", base, params)
        self.theirs = _optimizer(torch, "torch.optim", base, params)
        self.ours.step()
        self.theirs.step()

    def teardown(self, base):
        self.torch.set_num_threads(self.threads)

    @staticmethod
    def _timed(opt):
        start = time.thread_time()
        opt.step()
        return time.thread_time() - start

    def track_step_time_ratio(self, base):
        ratios = []
        for i in range(self.pairs):
            if i % 2:  # alternate who goes first: neither gets the warmer cache every time
                ours, theirs = self._timed(self.ours), self._timed(self.theirs)
            else:
                theirs, ours = self._timed(self.theirs), self._timed(self.ours)
            ratios.append(ours / theirs)
        return statistics.median(ratios)

    track_step_time_ratio.unit = "ProjUNN time / torch.optim time"
