"""Layers: ``UnitaryRNN`` forward + backward against a hand-written loop.

The issue asked for a recurrent loop that is not slower than a hand-written
one; this benchmark keeps it so (an indexing slip once made the backward pass
O(T^2): 40x slower at T = 1000). PyTorch on the CPU, one thread, so that the
ratio of the two implementations is steady on a shared machine.
"""


class RNNForwardBackward:
    params = ([100, 1000], [False, True], ["UnitaryRNN", "hand-written"])
    param_names = ("T", "complex", "implementation")
    timeout = 300

    def setup(self, T, complex_, implementation):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("PyTorch is not installed") from None
        from unitary_lr.torch import UnitaryRNN

        self.torch = torch
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.rnn = UnitaryRNN(10, 128, complex=complex_, generator=torch.Generator().manual_seed(0))
        self.x = torch.randn(T, 64, 10, generator=torch.Generator().manual_seed(1))
        self.forward = self.rnn if implementation == "UnitaryRNN" else self._hand_written

    def teardown(self, T, complex_, implementation):
        self.torch.set_num_threads(self.threads)

    def _hand_written(self, x):
        rnn = self.rnn
        h = self.torch.zeros(x.shape[1], rnn.hidden_size, dtype=rnn.weight_hh.dtype)
        outputs = []
        for t in range(x.shape[0]):
            h = rnn.activation(h @ rnn.weight_hh.T + x[t].to(rnn.weight_ih.dtype) @ rnn.weight_ih.T)
            outputs.append(h)
        return self.torch.stack(outputs), h

    def time_forward_backward(self, T, complex_, implementation):
        self.rnn.zero_grad()
        outputs, _ = self.forward(self.x)
        outputs.abs().sum().backward()
