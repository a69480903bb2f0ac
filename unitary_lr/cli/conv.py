"""``unitary-lr conv``: a deep stack of orthogonal convolutions, with and
without the constraint.

Images are generated, not downloaded: noisy sinusoidal gratings whose class
is their orientation (0, 45, 90 or 135 degrees), with random frequency, phase
and contrast. The network lifts the image to c channels, applies ``depth``
blocks of FourierConv2d and a MaxMin activation (which sorts channel pairs:
it preserves norms and gradient norms), pools and reads out a class. With the
convolutions kept orthogonal by projUNN every block preserves the norm of
signals and gradients, however deep the stack; trained without the constraint
(the same parameters, the same Adam) the stack's gain is free to grow or shrink
with depth. The plot shows both runs' training loss, test accuracy and the
norm of the gradient reaching the first layer.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np

from . import _compile, _options, _output
from ._output import CommandError, torch_session
from ._session import execute

CLASSES = 4
# --quick fills only the sizes the command line leaves out
DEFAULTS = {"depth": 32, "size": 8, "steps": 200}
QUICK = {"depth": 8, "size": 8, "steps": 150}


def add_parser(commands):
    parents = [
        _options.variant_options(default="direct"),
        _options.quick_options(f"depth {QUICK['depth']}, {QUICK['size']} x {QUICK['size']} images, {QUICK['steps']} "
                               "steps, where --depth, --size, --steps do not say otherwise"),
        _options.seed_options("the networks, the data and the sketches"),
        _options.torch_device_options(),
        _compile.compile_options(),
        _options.experiment_run_options("conv"),
    ]
    parser = commands.add_parser("conv", help="a deep orthogonal CNN on generated images, with and without the constraint",
                                 description=_options.paragraph(__doc__, 1), parents=parents)
    parser.add_argument("--depth", type=int, default=None,
                        help=f"FourierConv2d blocks (default: {DEFAULTS['depth']}; --quick: {QUICK['depth']})")
    parser.add_argument("--channels", type=int, default=8, help="channels c, even (default: 8)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"images are size x size (default: {DEFAULTS['size']}; --quick: {QUICK['size']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per run (default: {DEFAULTS['steps']}; --quick: {QUICK['steps']})")
    parser.add_argument("--batch", type=int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate (default: 1e-2)")
    parser.add_argument("--rank", type=int, default=1, help="rank k of the projUNN updates (default: 1)")
    parser.add_argument("--noise", type=float, default=1.0, help="standard deviation of the pixel noise (default: 1)")
    parser.add_argument("--runs", nargs="+", choices=("orthogonal", "unconstrained"),
                        default=["orthogonal", "unconstrained"], help="(default: both)")
    parser.set_defaults(run=run)


def _validate(args):
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:  # an explicit value always wins over --quick
            setattr(args, name, value)
    for flag, value, minimum in (("--depth", args.depth, 1), ("--channels", args.channels, 2), ("--size", args.size, 4),
                                 ("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--seed", args.seed, 0)):
        if value < minimum:
            raise CommandError(f"{flag} must be >= {minimum}, got {value}")
    if args.channels % 2:
        raise CommandError(f"--channels must be even (MaxMin sorts channel pairs), got {args.channels}")
    if not 1 <= args.rank <= args.channels:
        raise CommandError(f"--rank must lie in [1, channels = {args.channels}], got {args.rank}")
    for flag, value in (("--lr", args.lr), ("--noise", args.noise)):
        if not (math.isfinite(value) and value >= 0) or (flag == "--lr" and value == 0):
            raise CommandError(f"{flag} must be finite and {'> 0' if flag == '--lr' else '>= 0'}, got {value}")
    _output.check_run_options(args)


def gratings(torch, count, size, noise, generator):
    """(count, 1, size, size) images and their orientation classes in 0..3."""
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    angle = labels.double() * math.pi / CLASSES
    frequency = 2 * math.pi * (0.15 + 0.2 * torch.rand(count, generator=generator, dtype=torch.float64))
    phase = 2 * math.pi * torch.rand(count, generator=generator, dtype=torch.float64)
    contrast = 0.5 + torch.rand(count, generator=generator, dtype=torch.float64)
    grid = torch.arange(size, dtype=torch.float64)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    along = x[None] * torch.cos(angle)[:, None, None] + y[None] * torch.sin(angle)[:, None, None]
    images = contrast[:, None, None] * torch.cos(frequency[:, None, None] * along + phase[:, None, None])
    images = images + noise * torch.randn(count, size, size, generator=generator, dtype=torch.float64)
    return images[:, None].float(), labels


def _network(torch, args, device):
    from ..torch import FourierConv2d

    class MaxMin(torch.nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(args.seed)
            self.blocks = torch.nn.ModuleList(
                FourierConv2d(args.channels, (args.size, args.size), init="haar", device=device, generator=generator)
                for _ in range(args.depth)
            )
            self.activation = MaxMin()
            self.readout = torch.nn.Linear(args.channels, CLASSES, device=device)

        def forward(self, images):
            x = torch.nn.functional.pad(images, (0, 0, 0, 0, 0, args.channels - 1))  # lift to c channels
            for block in self.blocks:
                x = self.activation(block(x))
            return self.readout(x.mean(dim=(2, 3)) * args.size)  # pooled, scale-free in the size

    return Net()


def _first_layer_gradient(net):
    grads = [p.grad for p in net.blocks[0].parameters() if p.grad is not None]
    return float(sum(float(g.abs().square().sum()) for g in grads) ** 0.5)


def run(args) -> int:
    _validate(args)
    # what the work leaves for the report, however far it got; the compile
    # mode is known once the device is, and the report needs it even if that fails
    state = SimpleNamespace(results=[], compile_mode=None)
    return execute(args, lambda session: _train(args, state, session),
                   lambda session: _report(args, state.results, state.compile_mode, session.interrupted),
                   description="conv", plot=args.png_path is not None, torch=True)


def _train(args, state, session):
    torch, device = torch_session(args)
    from ..torch import ProjUNN

    mode = state.compile_mode = _compile.compile_mode(args.compile, device)
    bar = session.progress(len(args.runs) * args.steps)
    test_x, test_y = gratings(torch, 1000, args.size, args.noise, torch.Generator().manual_seed(args.seed + 1))
    test_x, test_y = test_x.to(device), test_y.to(device)
    for kind in dict.fromkeys(args.runs):
        torch.manual_seed(args.seed)
        net = _network(torch, args, device)
        # the same parameters and the same Adam; only the constraint differs
        groups = (net.parameters() if kind == "orthogonal"
                  else [{"params": list(net.parameters()), "unitary": False}])
        optimizer = ProjUNN(groups, lr=args.lr, base="adam", rank=args.rank, variant=args.variant,
                            seed=args.seed)
        compute_loss = _compile.loss_function(
            torch, lambda x, y, net=net: torch.nn.functional.cross_entropy(net(x), y), mode=mode)
        data = torch.Generator().manual_seed(args.seed + 2)
        record = {"run": kind, "train_loss": [], "first_layer_gradient": [], "test_steps": [],
                  "test_accuracy": []}
        state.results.append(record)
        start, step_seconds = time.perf_counter(), []
        for step in range(1, args.steps + 1):
            began = time.perf_counter()
            x, y = gratings(torch, args.batch, args.size, args.noise, data)
            # gradients go before the forward: under CUDA graphs the
            # replay may overwrite the memory of the last step's ones
            optimizer.zero_grad()
            _compile.mark_step_begin(torch, mode)
            loss = compute_loss(x.to(device), y.to(device))
            loss.backward()
            gradient = _first_layer_gradient(net)
            if not math.isfinite(loss.item()) or not math.isfinite(gradient):
                record["first_layer_gradient"].append(gradient)
                record["train_loss"].append(loss.item())
                record["diverged_at"] = step
                break
            try:
                optimizer.step()
            except ValueError:  # a NaN/Inf gradient: the unconstrained run has blown up
                record["first_layer_gradient"].append(gradient)
                record["train_loss"].append(loss.item())
                record["diverged_at"] = step
                break
            value = loss.item()
            _compile.synchronize(torch, device)
            step_seconds.append(time.perf_counter() - began)
            record["first_layer_gradient"].append(gradient)
            record["train_loss"].append(value)
            if step % max(args.steps // 10, 1) == 0 or step == args.steps:
                with torch.no_grad():
                    accuracy = (net(test_x).argmax(dim=1) == test_y).float().mean().item()
                record["test_steps"].append(step)
                record["test_accuracy"].append(accuracy)
            bar.update(1)
            bar.set_postfix_str(f"{kind} loss {loss.item():.3f}", refresh=False)
        record["seconds"] = time.perf_counter() - start
        record.update(_compile.step_timing(step_seconds))
        record["final_test_accuracy"] = record["test_accuracy"][-1] if record["test_accuracy"] else None
        record["unitarity_error"] = _operator_error(torch, net)


def _close_interrupted(record):
    """Cut the interrupted run's paired lists to the length they share: an
    interrupt can land between the two appends of a pair."""
    for first, second in (("train_loss", "first_layer_gradient"), ("test_steps", "test_accuracy")):
        done = min(len(record[first]), len(record[second]))
        del record[first][done:], record[second][done:]
    record.setdefault("final_test_accuracy", record["test_accuracy"][-1] if record["test_accuracy"] else None)


def _operator_error(torch, net):
    """How far the first block is from an isometry: | ||conv(x)|| / ||x|| - 1 | on random x."""
    block = net.blocks[0]
    with torch.no_grad():
        x = torch.randn(8, block.channels, *block.size, generator=torch.Generator().manual_seed(0)).to(block.weight.device)
        ratio = torch.linalg.vector_norm(block(x), dim=(1, 2, 3)) / torch.linalg.vector_norm(x, dim=(1, 2, 3))
    return float((ratio - 1).abs().max())


def _report(args, results, mode, interrupted):
    if interrupted and results:
        _close_interrupted(results[-1])
    rows = [(r["run"], len(r["train_loss"]), f"{r['train_loss'][-1]:.4g}" if r["train_loss"] else "-",
             "-" if r.get("final_test_accuracy") is None else f"{r['final_test_accuracy']:.3f}",
             r.get("diverged_at", "-"),
             f"{r['unitarity_error']:.1e}" if r.get("unitarity_error") is not None else "-",
             *_compile.format_step_timing(r)) for r in results]
    print(_output.format_table(("run", "steps", "last loss", "test accuracy", "diverged at", "| ||conv x||/||x|| - 1 |",
                        "first step s", "later steps ms"), rows))
    if mode is not None:
        print(f"--compile ({mode}): the first step holds the compile time; later steps: their median")
    record = _output.run_record(args, "conv", {
        "settings": {"depth": args.depth, "channels": args.channels, "size": args.size, "steps": args.steps,
                     "batch": args.batch, "lr": args.lr, "rank": args.rank, "variant": args.variant,
                     "noise": args.noise, "seed": args.seed, "quick": args.quick, "threads": args.threads,
                     "compile": mode},
        "status": "interrupted" if interrupted else "done",
        "results": results,
    }, versions=_output.loaded_versions(["torch"]))
    title = f"{args.depth} FourierConv2d blocks, {args.channels} channels, {args.size} x {args.size} images"
    return _output.write_outputs(args, record, plot=(lambda path: _plot(path, results, title=title))
                         if any(r["train_loss"] for r in results) else None)


def _plot(path, results, *, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.6), layout="constrained")
    loss_axes, accuracy_axes, gradient_axes = figure.subplots(1, 3)
    for r in results:
        steps = np.arange(1, len(r["train_loss"]) + 1)
        loss_axes.plot(steps, r["train_loss"], label=r["run"], linewidth=1)
        accuracy_axes.plot(r["test_steps"], r["test_accuracy"], marker="o", markersize=3, label=r["run"])
        gradient_axes.plot(np.arange(1, len(r["first_layer_gradient"]) + 1), r["first_layer_gradient"],
                           label=r["run"], linewidth=1)
    loss_axes.set(title="training loss", xlabel="step", yscale="log")
    accuracy_axes.set(title="test accuracy", xlabel="step", ylim=(0, 1.02))
    accuracy_axes.axhline(1 / CLASSES, color="black", linestyle="--", linewidth=1, label="chance")
    gradient_axes.set(title="gradient norm at the first block", xlabel="step", yscale="log")
    for axes in (loss_axes, accuracy_axes, gradient_axes):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    _output.save_figure(figure, path, dpi=110)
