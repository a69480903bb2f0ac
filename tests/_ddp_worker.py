"""Training run used by test_distributed.py: in DDP workers or in one process."""

import torch

from unitary_lr.torch import ProjUNN, UnitaryRNN, is_unitary

GLOBAL_BATCH, STEPS, INPUT, HIDDEN, TIME = 8, 25, 3, 12, 9


class Net(torch.nn.Module):
    """A complex unitary (or a real orthogonal) RNN with a real readout of
    its last state."""

    def __init__(self, complex_=True):
        super().__init__()
        self.rnn = UnitaryRNN(INPUT, HIDDEN, complex=complex_, dtype=torch.float64, batch_first=True)
        self.readout = torch.nn.Linear((2 if complex_ else 1) * HIDDEN, 1, dtype=torch.float64)

    def forward(self, x):
        last = self.rnn(x)[0][:, -1]
        if last.is_complex():
            last = torch.cat([last.real, last.imag], dim=-1)
        return self.readout(last).squeeze(-1)


# ZeroRedundancyOptimizer's runs: full-rank steps (the sketch holds all of the
# direction, so where each rank's streams start changes nothing) and options
# that exercise its hand-back of whole groups to ProjUNN's constructor
ZERO_OPTIONS = {"lr": 1e-2, "base": "adam", "rank": HIDDEN, "betas": (0.8, 0.95), "amsgrad": True, "seed": 0}


def explicit_groups(model):
    """The unitary and the plain parameters in groups of their own, as
    ZeroRedundancyOptimizer needs them (it merges bare parameters into one
    group before ProjUNN sees them)."""
    params = list(model.parameters())
    return [{"params": [p for p in params if is_unitary(p)], "unitary": True},
            {"params": [p for p in params if not is_unitary(p)], "unitary": False}]


def train(net, model, shard=slice(None), make_optimizer=None):
    """``model`` is ``net`` or DDP(net); returns the trained state."""
    torch.manual_seed(0)  # the optimizer draws its sketch seed from torch's generator
    if make_optimizer is None:
        optimizer = ProjUNN(model.parameters(), lr=1e-2, base="adam", rank=2)
    else:
        optimizer = make_optimizer(model)
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, TIME, INPUT, dtype=torch.float64, generator=data)
        y = x.sum(dim=(1, 2)).sin()
        optimizer.zero_grad()
        torch.mean((model(x[shard]) - y[shard]) ** 2).backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in net.state_dict().items()}


def build(complex_=True):
    torch.manual_seed(0)  # the same initial model on every replica
    return Net(complex_)


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


def zero_worker(rank, world_size, init_file, out_dir):
    """DDP with ZeroRedundancyOptimizer(optimizer_class=ProjUNN): each rank
    keeps and steps the state of its share of the parameters."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        net = build(complex_=False)  # ZeroRedundancyOptimizer takes parameters of one dtype

        def zero(model):
            return ZeroRedundancyOptimizer(explicit_groups(model), optimizer_class=ProjUNN, **ZERO_OPTIONS)

        state = train(net, DistributedDataParallel(net), shard=slice(rank, None, world_size), make_optimizer=zero)
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def seed_worker(rank, world_size, init_file, out_dir):
    """Ranks that seed torch differently (``base + rank``): ``seed=None`` warns
    in ProjUNN and projunn_retraction; the same explicit seed keeps the
    replicas identical."""
    import warnings

    import torch.distributed as dist

    from unitary_lr.torch import projunn_retraction, unitary_parameter

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(1000 + rank)
        W = unitary_parameter(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ProjUNN([W], lr=0.1, rank=2)
            projunn_retraction(torch.optim.SGD([W], lr=0.1), rank=2)
            opt = ProjUNN([W], lr=0.1, rank=2, seed=5)
        W.grad = torch.ones(6, 6, dtype=torch.float64)
        opt.step()
        torch.save({"warnings": [str(w.message) for w in caught], "W": W.detach()}, f"{out_dir}/seed{rank}.pt")
    finally:
        dist.destroy_process_group()


def broadcast_worker(rank, world_size, init_file, out_dir):
    """Rank 0 loads a checkpoint written in half precision and broadcasts it
    (a collective's write moves no version counter on the other ranks): the
    drift checks of ProjUNN and of projunn_retraction must not depend on
    what one rank saw, or the replicas re-project apart."""
    import torch.distributed as dist

    from unitary_lr.torch import ProjUNN, orthogonal, projunn_retraction

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = {}
        for how in ("ProjUNN", "retraction"):
            torch.manual_seed(0)
            layer = orthogonal(torch.nn.Linear(16, 16, bias=False))
            if how == "ProjUNN":
                opt = ProjUNN(layer.parameters(), lr=1e-2, rank=2, seed=0)
            else:
                opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
                retraction = projunn_retraction(opt, rank=2, seed=0)
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
            for step in range(4):
                if step == 2:
                    if rank == 0:
                        layer.load_state_dict({"weight": layer.weight.detach().half().float()})
                    with torch.no_grad():
                        dist.broadcast(layer.weight, 0)
                opt.zero_grad()
                layer(x).square().sum().backward()
                opt.step()
            state = opt.state[layer.weight] if how == "ProjUNN" else retraction.state[layer.weight]
            result[how] = (layer.weight.detach().clone(), state["reprojections"])
        torch.save(result, f"{out_dir}/broadcast{rank}.pt")
    finally:
        dist.destroy_process_group()
