"""``unitary-lr copy`` and ``unitary-lr adding``: the projUNN paper's sequence
tasks, with its settings as defaults.

Copy task (Arjovsky, Shah and Bengio, 2016): K = 10 symbols drawn from 8,
then T - 1 blanks, a marker, and K more blanks; the model must output blanks
and then, after the marker, the K symbols. Cross-entropy per step; a model
that has forgotten the symbols can do no better than K log(8) / (T + 2K).

Adding task (Le, Jaitly and Hinton, 2015): T numbers drawn uniformly from
[0, 1] and a second channel marking one of the first T/2 and one of the last
T/2; the target is the sum of the two marked numbers. Mean squared error of
the last output; always answering 1 scores 1/6 (the sum's variance).

Both train a UnitaryRNN with the ProjUNN optimizer (the unitary group's lr a
given ratio smaller, as in the paper), or, for comparison, an unconstrained
RNN or LSTM with the same base optimizer. Several ranks, variants or models
run one after the other on the same data and share one plot.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np

from . import _compile, _options, _output
from ._output import CommandError, torch_session
from ._session import execute

# The paper's settings (Kiani et al. 2022, section 5).
TASKS = {
    "copy": dict(T=1000, hidden=190, batch=128, lr=7e-4, init="henaff", nonlinearity="modrelu", steps=4000,
                 quick=dict(T=100, hidden=128, steps=600)),
    "adding": dict(T=200, hidden=170, batch=50, lr=1e-3, init="identity", nonlinearity="relu", steps=6000,
                   # measured: RMSprop at lr 1e-3 needs far more than 4,000 steps at T = 50; Adam does not
                   quick=dict(T=50, hidden=64, steps=4000, optimizer="adam", lr=2e-3)),
}
SYMBOLS, K = 8, 10


def add_parser(commands):
    for task, settings in TASKS.items():
        doc = _options.paragraph(__doc__, 1 if task == "copy" else 2)
        quick = settings["quick"]
        parents = [
            _options.ranks_options(default=[1], what="the unitary updates to compare"),
            _options.variant_options(default="tangent", several=True),
            _options.base_rule_options(
                "--optimizer", default=None,
                help=f"base rule, one of %(choices)s (default: rmsprop; --quick: {quick.get('optimizer', 'rmsprop')})"),
            _options.quick_options("a small version that runs in minutes on a CPU"),
            _options.seed_options("the model, the data and the sketches"),
            _options.torch_device_options(),
            _compile.compile_options(recurrence=True),
            _options.experiment_run_options(task),
        ]
        parser = commands.add_parser(task, help=doc.split(":")[0] + ", from the projUNN paper", description=doc,
                                     parents=parents)
        parser.add_argument("--T", type=int, default=None,
                            help=f"sequence length / delay (default: {settings['T']}; --quick: {quick['T']})")
        parser.add_argument("--hidden", type=int, default=None,
                            help=f"hidden size (default: {settings['hidden']}; --quick: {quick['hidden']})")
        parser.add_argument("--steps", type=int, default=None,
                            help=f"training steps (default: {settings['steps']}; --quick: {quick['steps']})")
        parser.add_argument("--batch", type=int, default=settings["batch"], help=f"(default: {settings['batch']})")
        parser.add_argument("--models", nargs="+", choices=("unitary", "rnn", "lstm"), default=["unitary"],
                            help="unitary: UnitaryRNN with projUNN; rnn, lstm: unconstrained baselines (default: unitary)")
        parser.add_argument("--lr", type=float, default=None,
                            help=f"(default: {settings['lr']}; --quick: {quick.get('lr', settings['lr'])})")
        parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                            help="constant (the paper's) or cosine decay to 0 over the steps; the unitary "
                                 "group's lr follows, keeping its ratio (default: constant)")
        parser.add_argument("--unitary-lr-ratio", type=float, default=32.0,
                            help="the unitary matrix's lr is lr divided by this (default: 32)")
        parser.add_argument("--complex", action="store_true", help="complex hidden state and unitary W (else orthogonal)")
        parser.add_argument("--init", choices=("henaff", "identity", "haar"), default=settings["init"],
                            help=f"(default: {settings['init']})")
        parser.add_argument("--eval-every", type=int, default=100, help="steps between test-set evaluations (default: 100)")
        parser.set_defaults(run=run, task=task)


def _settings(args):
    defaults = TASKS[args.task]
    quick = defaults["quick"] if args.quick else {}
    T = args.T if args.T is not None else quick.get("T", defaults["T"])
    hidden = args.hidden if args.hidden is not None else quick.get("hidden", defaults["hidden"])
    steps = args.steps if args.steps is not None else quick.get("steps", defaults["steps"])
    if args.lr is None:
        args.lr = quick.get("lr", defaults["lr"])
    if args.optimizer is None:
        args.optimizer = quick.get("optimizer", "rmsprop")
    if args.compile_steps is not None and args.compile is None:
        raise CommandError(f"--compile-steps {args.compile_steps} needs --compile: without it nothing is compiled")
    if args.compile_steps is None:
        args.compile_steps = _compile.COMPILE_STEPS
    checks = [("--T", T, 1 if args.task == "copy" else 2), ("--hidden", hidden, 2), ("--steps", steps, 1),
              ("--batch", args.batch, 1), ("--eval-every", args.eval_every, 1), ("--seed", args.seed, 0),
              ("--compile-steps", args.compile_steps, 1)]
    for flag, value, minimum in checks:
        if value < minimum:
            raise CommandError(f"{flag} must be >= {minimum}, got {value}")
    bad = [k for k in args.ranks if not 1 <= k <= hidden]
    if bad:
        raise CommandError(f"--ranks must lie in [1, hidden = {hidden}], got {bad[0]}")
    for flag, value in (("--lr", args.lr), ("--unitary-lr-ratio", args.unitary_lr_ratio)):
        if not (math.isfinite(value) and value > 0):
            raise CommandError(f"{flag} must be finite and > 0, got {value}")
    _output.check_run_options(args)
    return T, hidden, steps


def _runs(args):
    runs = []
    for model in dict.fromkeys(args.models):
        if model == "unitary":
            runs += [{"model": model, "rank": k, "variant": v} for v in args.variants for k in args.ranks]
        else:
            runs.append({"model": model})
    return runs


def _label(run):
    if run["model"] != "unitary":
        return run["model"].upper()
    return f"{_options.variant_label(run['variant'])}, k = {run['rank']}"


class CopyTask:
    inputs, outputs = SYMBOLS + 2, SYMBOLS + 1  # symbols 1..8, blank 0, marker 9

    def __init__(self, T):
        self.T = T
        self.baseline = K * math.log(SYMBOLS) / (T + 2 * K)
        self.metric = "cross-entropy per step"

    def batch(self, torch, size, generator, device):
        symbols = torch.randint(1, SYMBOLS + 1, (size, K), generator=generator)
        x = torch.zeros(size, self.T + 2 * K, dtype=torch.long)
        x[:, :K] = symbols
        x[:, self.T + K - 1] = SYMBOLS + 1
        y = torch.zeros(size, self.T + 2 * K, dtype=torch.long)
        y[:, self.T + K:] = symbols
        return torch.nn.functional.one_hot(x, self.inputs).float().to(device), y.to(device)

    def loss(self, torch, outputs, y):
        return torch.nn.functional.cross_entropy(outputs.reshape(-1, self.outputs), y.reshape(-1))


class AddingTask:
    inputs, outputs = 2, 1

    def __init__(self, T):
        self.T = T
        self.baseline = 1 / 6
        self.metric = "mean squared error"

    def batch(self, torch, size, generator, device):
        values = torch.rand(size, self.T, generator=generator)
        half = self.T // 2
        first = torch.randint(0, half, (size,), generator=generator)
        second = torch.randint(half, self.T, (size,), generator=generator)
        marks = torch.zeros(size, self.T)
        rows = torch.arange(size)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        return torch.stack([values, marks], dim=-1).to(device), target.to(device)

    def loss(self, torch, outputs, y):
        return torch.mean((outputs[:, -1, 0] - y) ** 2)


def _model(torch, run, task, hidden, args, device):
    from ..torch import UnitaryRNN

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if run["model"] == "unitary":
                self.rnn = UnitaryRNN(task.inputs, hidden, complex=args.complex, nonlinearity=TASKS[args.task]["nonlinearity"],
                                      init=args.init, batch_first=True, device=device)
                features = 2 * hidden if args.complex else hidden
            else:
                kind = torch.nn.LSTM if run["model"] == "lstm" else torch.nn.RNN
                self.rnn = kind(task.inputs, hidden, batch_first=True, device=device)
                features = hidden
            self.readout = torch.nn.Linear(features, task.outputs, device=device)

        def forward(self, x):
            h = self.rnn(x)[0]
            if h.is_complex():
                h = torch.cat([h.real, h.imag], dim=-1)
            return self.readout(h)

    return Net()


def _optimizer(run, net, args):
    from ..torch import ProjUNN, is_unitary

    unitary = [p for p in net.parameters() if is_unitary(p)]
    others = [p for p in net.parameters() if not is_unitary(p)]
    groups = [{"params": others}]
    if run["model"] == "unitary":
        groups.append({"params": unitary, "unitary": True, "lr": args.lr / args.unitary_lr_ratio,
                       "rank": run["rank"], "variant": run["variant"]})
    return ProjUNN(groups, lr=args.lr, base=args.optimizer, seed=args.seed)


def run(args) -> int:
    T, hidden, steps = _settings(args)
    # what the work leaves for the report, however far it got
    state = SimpleNamespace(task=CopyTask(T) if args.task == "copy" else AddingTask(T), results=[],
                            settings={"T": T, "hidden": hidden, "steps": steps, "device": args.device,
                                      "threads": args.threads, "compile": None,
                                      "compile_steps": None})
    return execute(args, lambda session: _train(args, hidden, steps, state, session),
                   lambda session: _report(args, state, session.interrupted),
                   description=args.task, plot=args.png_path is not None, torch=True)


def _train(args, hidden, steps, state, session):
    task, results, settings = state.task, state.results, state.settings
    torch, device = torch_session(args)
    settings["device"] = str(device)
    mode = settings["compile"] = _compile.compile_mode(args.compile, device)
    settings["compile_steps"] = None if mode is None else args.compile_steps
    runs = _runs(args)
    bar = session.progress(len(runs) * steps)
    test = task.batch(torch, 1000 if args.task == "adding" else 256,
                      torch.Generator().manual_seed(args.seed + 1), device)
    for spec in runs:
        torch.manual_seed(args.seed)
        net = _model(torch, spec, task, hidden, args, device)
        optimizer = _optimizer(spec, net, args)
        compute_loss = _compile.loss_function(torch, lambda x, y, net=net: task.loss(torch, net(x), y), mode=mode,
                                              recurrence=net.rnn if spec["model"] == "unitary" else None,
                                              steps=args.compile_steps)
        schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                    if args.lr_schedule == "cosine" else None)
        data = torch.Generator().manual_seed(args.seed + 2)  # the same batches for every run
        record = {**spec, "label": _label(spec), "train_loss": [], "test_steps": [], "test_loss": [],
                  "steps_done": 0}
        results.append(record)
        start, running, step_seconds = time.perf_counter(), None, []
        for step in range(1, steps + 1):
            began = time.perf_counter()
            x, y = task.batch(torch, args.batch, data, device)
            # gradients go before the forward: under CUDA graphs the
            # replay may overwrite the memory of the last step's ones
            optimizer.zero_grad()
            _compile.mark_step_begin(torch, mode)
            loss = compute_loss(x, y)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            value = loss.item()
            _compile.synchronize(torch, device)
            step_seconds.append(time.perf_counter() - began)
            record["train_loss"].append(value)
            record["steps_done"] = step
            record["seconds"] = time.perf_counter() - start
            running = value if running is None else 0.95 * running + 0.05 * value
            if step % args.eval_every == 0 or step == steps:
                with torch.no_grad(), _compile.eager():
                    test_loss = task.loss(torch, net(test[0]), test[1]).item()
                # the step is recorded with its loss, never before it is known
                record["test_steps"].append(step)
                record["test_loss"].append(test_loss)
                record.update(_compile.step_timing(step_seconds))
                # long runs: what is done so far survives even a hard kill
                _output.write_json(args.json_path, _record(args, task, results, "running", settings))
            bar.update(1)
            bar.set_postfix_str(f"{record['label']} loss {running:.4f} (baseline {task.baseline:.4f})",
                                refresh=False)
        record["final_test_loss"] = record["test_loss"][-1]
        record.update(_unitarity(torch, net))


def _close_interrupted(record):
    """Make the interrupted run's record whole: an interrupt can land between
    any two lines of the loop, so the lists are cut to the steps finished."""
    del record["train_loss"][record["steps_done"]:]
    done = min(len(record["test_steps"]), len(record["test_loss"]))
    del record["test_steps"][done:], record["test_loss"][done:]
    record.setdefault("final_test_loss", record["test_loss"][-1] if record["test_loss"] else None)


def _unitarity(torch, net):
    from ..torch import is_unitary

    errors = [float(_error(torch, p.detach())) for p in net.parameters() if is_unitary(p)]
    return {"unitarity_error": max(errors)} if errors else {}


def _error(torch, W):
    W = W.to(torch.complex128)
    n = W.shape[-1]
    return torch.linalg.matrix_norm(W.mH @ W - torch.eye(n, dtype=W.dtype, device=W.device)) / math.sqrt(n)


def _report(args, state, interrupted):
    task, results, settings = state.task, state.results, state.settings
    if interrupted and results:
        _close_interrupted(results[-1])
    rows = [(r["label"], r.get("steps_done", 0), _number(r.get("final_test_loss")),
             f"{r['seconds']:.0f}" if "seconds" in r else "-", *_compile.format_step_timing(r),
             _number(r.get("unitarity_error"), 1)) for r in results]
    print(_output.format_table(("run", "steps", f"test {task.metric}", "seconds", "first step s", "later steps ms",
                        "unitarity error"), rows))
    if settings["compile"] is not None:
        print(f"--compile ({settings['compile']}; the unitary RNN at most {settings['compile_steps']} time steps "
              "a graph): the first step holds the compile time; later steps: their median")
    print(f"memoryless baseline: {task.baseline:.4f}")
    title = f"{args.task} task, T = {settings['T']}, hidden {settings['hidden']}"
    return _output.write_outputs(args, _record(args, task, results, "interrupted" if interrupted else "done", settings),
                         plot=(lambda path: _plot(path, task, results, title=title))
                         if any(r["train_loss"] for r in results) else None)


def _record(args, task, results, status, settings):
    """The record so far; ``status`` is "running", "done" or "interrupted"."""
    return _output.run_record(args, args.task, {
        "settings": {**settings, "batch": args.batch, "optimizer": args.optimizer, "lr": args.lr,
                     "lr_schedule": args.lr_schedule,
                     "unitary_lr_ratio": args.unitary_lr_ratio, "complex": args.complex, "init": args.init,
                     "K": K if args.task == "copy" else None, "seed": args.seed, "quick": args.quick},
        "baseline": task.baseline,
        "status": status,
        "results": results,
    }, versions=_output.loaded_versions(["torch"]))


def _number(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def _plot(path, task, results, *, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.4), layout="constrained")
    axes = figure.subplots()
    for r in results:
        train = np.asarray(r["train_loss"])
        if len(train) >= 20:  # a running mean: single batches are noisy
            window = max(len(train) // 100, 10)
            train = np.convolve(train, np.ones(window) / window, mode="valid")
        line, = axes.plot(np.arange(1, len(train) + 1), train, alpha=0.5, linewidth=1)
        axes.plot(r["test_steps"], r["test_loss"], marker="o", markersize=3, color=line.get_color(),
                  label=f"{r['label']} (test)")
    axes.axhline(task.baseline, color="black", linestyle="--", label=f"memoryless baseline {task.baseline:.3g}")
    axes.set_yscale("log")
    axes.set(title=title, xlabel="step", ylabel=task.metric)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    _output.save_figure(figure, path, dpi=120)
