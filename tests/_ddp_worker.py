"""Training run used by test_distributed.py: in DDP workers or in one process."""

import torch

from unitary_lr.torch import ProjUNN, UnitaryRNN

GLOBAL_BATCH, STEPS, INPUT, HIDDEN, TIME = 8, 25, 3, 12, 9


class Net(torch.nn.Module):
    """A complex unitary RNN with a real readout of its last state."""

    def __init__(self):
        super().__init__()
        self.rnn = UnitaryRNN(INPUT, HIDDEN, complex=True, dtype=torch.float64, batch_first=True)
        self.readout = torch.nn.Linear(2 * HIDDEN, 1, dtype=torch.float64)

    def forward(self, x):
        last = self.rnn(x)[0][:, -1]
        return self.readout(torch.cat([last.real, last.imag], dim=-1)).squeeze(-1)


def train(net, model, shard=slice(None)):
    """``model`` is ``net`` or DDP(net); returns the trained state."""
    torch.manual_seed(0)  # the optimizer draws its sketch seed from torch's generator
    optimizer = ProjUNN(model.parameters(), lr=1e-2, base="adam", rank=2)
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, TIME, INPUT, dtype=torch.float64, generator=data)
        y = x.sum(dim=(1, 2)).sin()
        optimizer.zero_grad()
        torch.mean((model(x[shard]) - y[shard]) ** 2).backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in net.state_dict().items()}


def build():
    torch.manual_seed(0)  # the same initial model on every replica
    return Net()


def worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        net = build()
        # DDP averages the replicas' gradients during backward; each replica
        # sees every world_size-th sample of the global batch.
        state = train(net, DistributedDataParallel(net), shard=slice(rank, None, world_size))
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
