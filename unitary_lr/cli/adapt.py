"""``unitary-lr adapt``: fine-tuning a pre-trained network to a shifted task
with Householder adapters (HTA), SVD adapters with orthonormal factors, LoRA,
full fine-tuning and PEFT's HRA and OFT.

Nothing is downloaded: an MLP is pre-trained on scikit-learn's handwritten
digits (8 x 8 images, shipped with scikit-learn), then adapted to the same
digits rotated by 90 degrees (or with their pixels permuted). Every method
adapts the same three linear layers of the same pre-trained network, with
everything else frozen; the table and the plot give each method's test
accuracy on the shifted task against its number of trainable parameters,
over several seeds (one pre-training per seed). The SVD adapters are trained
by ``unitary_lr.torch.ProjUNN``, which keeps their factors U and V orthonormal;
their unitarity error after training is in the table and the JSON.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from types import SimpleNamespace

from . import _options, _output
from ._output import CommandError
from ._session import execute

METHODS = ("none", "full", "lora", "hta", "svd", "hra", "oft")
PEFT_METHODS = ("hra", "oft")
# Adam's learning rate per method: each method's best of {0.003, 0.01, 0.03,
# 0.1} (full: {0.001, 0.003, 0.01}) for the smaller size, seed 0, default
# settings (rotate, 40 + 30 epochs), so that no method is compared at a step
# size that suits another. Full fine-tuning moves every weight and needs the
# smallest step; LoRA r=4 diverges at 0.1. The SVD adapter has two rates, s's
# Adam rate and the projUNN rate of U and V (that times SVD_UNITARY_LR_SCALE),
# chosen on the grid {0.03, 0.1, 0.3} x {1, 0.3, 0.1}: with one rate for both
# (scale 1) its best is 0.67 at 0.1, against 0.84 at 0.1 x 0.3.
LEARNING_RATES = {"full": 1e-2, "lora": 3e-2, "hta": 1e-1, "svd": 1e-1, "hra": 1e-1, "oft": 3e-2}
SVD_UNITARY_LR_SCALE = 0.3
# --quick fills only what the command line leaves out
DEFAULTS = {"pretrain_epochs": 40, "epochs": 30, "seeds": [0, 1, 2]}
QUICK = {"pretrain_epochs": 15, "epochs": 8, "seeds": [0]}
LAYERS = ["0", "2", "4"]  # the MLP's nn.Linear layers, by their names in the nn.Sequential


def add_parser(commands):
    parents = [
        _options.quick_options(f"{QUICK['pretrain_epochs']} + {QUICK['epochs']} epochs and seed 0, where "
                               "--pretrain-epochs, --epochs, --seeds do not say otherwise"),
        _options.experiment_run_options("adapt"),
    ]
    parser = commands.add_parser("adapt", help="fine-tune a pre-trained MLP to a shifted task: HTA, SVD, LoRA, full, HRA, OFT",
                                 description=_options.paragraph(__doc__, 1), parents=parents)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, metavar="METHOD",
                        help=f"among {', '.join(METHODS)} ('none': the pre-trained network as it is); "
                             "hra and oft need PEFT (default: all; hra and oft are skipped, with a note, without PEFT)")
    parser.add_argument("--shift", choices=("rotate", "permute"), default="rotate",
                        help="the new task: the images rotated by 90 degrees, or their pixels permuted (default: rotate)")
    parser.add_argument("--hidden", type=int, default=64, help="width of the MLP's two hidden layers (default: 64)")
    parser.add_argument("--reflectors", type=int, nargs="+", default=[1, 4],
                        help="HTA: Householder reflections per side, one run each (default: 1 4)")
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[1, 4], help="LoRA ranks (default: 1 4)")
    parser.add_argument("--svd-ranks", type=int, nargs="+", default=[1, 4],
                        help="SVD adapter: ranks r, (n_out + n_in + 1) r parameters a layer, about LoRA's "
                             "r (n_out + n_in) (default: 1 4)")
    parser.add_argument("--hra-ranks", type=int, nargs="+", default=[2, 8],
                        help="PEFT HRA: reflections r, even (default: 2 8)")
    parser.add_argument("--oft-block-sizes", type=int, nargs="+", default=[4, 8],
                        help="PEFT OFT: sizes of the rotation blocks, dividing --hidden and 64 (default: 4 8)")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help=f"(default: {DEFAULTS['pretrain_epochs']}; --quick: {QUICK['pretrain_epochs']})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of adaptation (default: {DEFAULTS['epochs']}; --quick: {QUICK['epochs']})")
    parser.add_argument("--batch", type=int, default=64, help="(default: 64)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one pre-training and one adaptation per method for each (default: 0 1 2; --quick: 0)")
    parser.set_defaults(run=run)


def _validate(args):
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:  # an explicit value always wins over --quick
            setattr(args, name, value)
    for flag, value, minimum in (("--hidden", args.hidden, 1), ("--pretrain-epochs", args.pretrain_epochs, 0),
                                 ("--epochs", args.epochs, 1), ("--batch", args.batch, 1)):
        if value < minimum:
            raise CommandError(f"{flag} must be >= {minimum}, got {value}")
    for seed in args.seeds:
        if seed < 0:
            raise CommandError(f"--seeds must be >= 0, got {seed}")
    args.seeds = list(dict.fromkeys(args.seeds))
    explicit = args.methods is not None
    args.methods = list(dict.fromkeys(args.methods or METHODS))
    # the sizes of the methods that run (the defaults of one left out, such
    # as --lora-ranks 4 beside --hidden 3, stopped a run of HTA alone)
    smallest = min(args.hidden, 10)  # min(n_out, n_in) of the output layer
    for method, flag, values, upper in (("hta", "--reflectors", args.reflectors, smallest),
                                        ("lora", "--lora-ranks", args.lora_ranks, smallest),
                                        ("svd", "--svd-ranks", args.svd_ranks, smallest),
                                        ("hra", "--hra-ranks", args.hra_ranks, min(args.hidden, 64))):
        for value in values if method in args.methods else ():
            if not 1 <= value <= upper:
                raise CommandError(f"{flag} must lie in [1, {upper}], got {value}")
    for value in args.hra_ranks if "hra" in args.methods else ():
        if value % 2:
            raise CommandError(f"--hra-ranks must be even (HRA's initialization pairs its reflections), got {value}")
    for value in args.oft_block_sizes if "oft" in args.methods else ():
        if value < 2 or 64 % value or args.hidden % value:
            raise CommandError(f"--oft-block-sizes must be >= 2 and divide 64 and --hidden = {args.hidden}, got {value}")
    args.skipped = {}
    wanted_peft = [m for m in args.methods if m in PEFT_METHODS]
    if wanted_peft:
        from .._peft_support import peft_problem

        problem = peft_problem()
        if problem is not None:
            if explicit:
                raise CommandError(f"--methods {' '.join(wanted_peft)} needs PEFT: {problem}")
            args.skipped = {m: problem for m in wanted_peft}
            args.methods = [m for m in args.methods if m not in PEFT_METHODS]
    _output.check_run_options(args)


def _variants(args):
    """(method, size, label) of every adaptation run, in order."""
    sizes = {"none": [None], "full": [None], "lora": args.lora_ranks, "hta": args.reflectors,
             "svd": args.svd_ranks, "hra": args.hra_ranks, "oft": args.oft_block_sizes}
    names = {"lora": "LoRA r={}", "hta": "HTA j={}", "svd": "SVD r={}", "hra": "HRA r={}", "oft": "OFT block {}"}
    return [(method, size, names[method].format(size) if size is not None else method)
            for method in args.methods for size in dict.fromkeys(sizes[method])]


def digits(shift, seed=0):
    """(train_x, train_y, test_x, test_y, shifted_train_x, shifted_test_x) as
    float32/int64 tensors: scikit-learn's 1797 digits scaled to [0, 1], a fixed
    2/3 : 1/3 split, and the same images under ``shift``."""
    import numpy as np
    import torch

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CommandError("scikit-learn is not installed (its digits are the data): pip install scikit-learn") from None
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    images, labels = images[order], data.target[order]
    if shift == "rotate":
        shifted = np.rot90(images, k=1, axes=(1, 2))
    else:  # one fixed permutation of the 64 pixels
        shifted = images.reshape(-1, 64)[:, rng.permutation(64)]
    split = 2 * len(images) // 3
    flat = torch.from_numpy(np.ascontiguousarray(images.reshape(-1, 64)))
    moved = torch.from_numpy(np.ascontiguousarray(shifted.reshape(-1, 64)))
    target = torch.from_numpy(labels.astype(np.int64))
    return flat[:split], target[:split], flat[split:], target[split:], moved[:split], moved[split:]


def _mlp(torch, hidden):
    nn = torch.nn
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class _LoRA:
    """LoRA (Hu et al. 2021) on a frozen nn.Linear: ``y = x W0^T + b + x A^T B^T``,
    A (r x n_in) random, B (n_out x r) zero so the layer starts as it was:
    r (n_in + n_out) parameters. Built by ``module(torch, linear, rank, generator)``."""

    @staticmethod
    def module(torch, linear, rank, generator):
        class LoRALinear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = linear.requires_grad_(False)
                scale = 1 / math.sqrt(linear.in_features)
                self.lora_A = torch.nn.Parameter(scale * torch.randn(rank, linear.in_features, generator=generator))
                self.lora_B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))

            def forward(self, x):
                return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T

        return LoRALinear()


def _adapted(torch, pretrained, method, size, seed):
    """A deep copy of ``pretrained`` with ``method``'s adapters on its three
    linear layers, everything else frozen."""
    import copy

    model = copy.deepcopy(pretrained)
    generator = torch.Generator().manual_seed(10_000 + seed)
    if method == "full":
        return model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if method == "none":
        return model
    if method == "lora":
        for name in LAYERS:
            model[int(name)] = _LoRA.module(torch, model[int(name)], size, generator)
        return model
    if method == "hta":
        from ..torch import add_householder_adapters

        return add_householder_adapters(model, target_modules=LAYERS, reflectors=size, generator=generator)
    if method == "svd":
        from ..torch import add_svd_adapters

        return add_svd_adapters(model, target_modules=LAYERS, rank=size, generator=generator)
    import peft

    torch.manual_seed(10_000 + seed)  # PEFT draws its initial weights from torch's global generator
    config = (peft.HRAConfig(r=size, target_modules=LAYERS) if method == "hra"
              else peft.OFTConfig(r=0, oft_block_size=size, target_modules=LAYERS))
    return peft.get_peft_model(model, config)


def _optimizer(torch, parameters, *, lr, seed):
    """Adam, or, where some parameters are marked unitary (the SVD adapters'
    U and V, n x r), ProjUNN with Adam as its base rule: projUNN steps of rank
    r (the rank of U's and V's gradients) keep those orthonormal, and the
    others get the same Adam steps as torch.optim's."""
    from ..torch import ProjUNN, is_unitary

    unitary = [p for p in parameters if is_unitary(p)]
    if unitary:
        return ProjUNN(parameters, lr=lr, base="adam", rank=min(p.shape[-1] for p in unitary),
                       unitary_lr_scale=SVD_UNITARY_LR_SCALE, seed=seed)
    return torch.optim.Adam(parameters, lr=lr)


def _unitarity_error(model):
    """The largest unitarity error of the SVD adapters' U and V (None without
    SVD adapters): ``||U^H U - I||_F / sqrt(r)``, in float64."""
    from .. import unitarity_error
    from ..torch import SVDAdapter

    errors = [float(unitarity_error(factor.detach())) for module in model.modules() if isinstance(module, SVDAdapter)
              for factor in (module.U, module.V)]
    return max(errors) if errors else None


def _train(torch, model, x, y, *, epochs, batch, lr, seed, bar):
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        return
    optimizer = _optimizer(torch, parameters, lr=lr, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            rows = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.update(1)


def _accuracy(torch, model, x, y):
    # no `with torch.no_grad()`: an interrupt can land between the with
    # statement's __enter__ and its body, which leaves gradients off for the
    # rest of the process; a small graph, dropped at once, costs nothing here
    return float((model(x).detach().argmax(dim=1) == y).float().mean())


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(args) -> int:
    _validate(args)
    try:
        import torch  # noqa: F401 - a clear error now rather than in the run
    except ImportError:
        raise CommandError("PyTorch is not installed: pip install torch") from None
    for method, reason in args.skipped.items():
        print(f"unitary-lr adapt: skipping {method}: {reason}", file=sys.stderr)
    variants = _variants(args)
    # what the work leaves for the report, however far it got
    state = SimpleNamespace(pretrained=[], results=[
        {"method": method, "size": size, "label": label, "trainable_parameters": None, "seeds": [], "accuracy": [],
         "original_task_accuracy": [], "seconds": [], **({"unitarity_error": []} if method == "svd" else {})}
        for method, size, label in variants])
    return execute(args, lambda session: _adapt_all(args, variants, state, session),
                   lambda session: _report(args, state.results, state.pretrained, session.interrupted),
                   description="adapt", plot=args.png_path is not None, torch=True)


def _adapt_all(args, variants, state, session):
    import torch  # run() checked that it is there

    train_x, train_y, test_x, test_y, shifted_train_x, shifted_test_x = digits(args.shift)
    adapting = sum(method != "none" for method, _, _ in variants)
    bar = session.progress(len(args.seeds) * (args.pretrain_epochs + adapting * args.epochs), unit="epoch")
    for seed in args.seeds:
        torch.manual_seed(seed)
        pretrained = _mlp(torch, args.hidden)
        _train(torch, pretrained, train_x, train_y, epochs=args.pretrain_epochs, batch=args.batch, lr=1e-2,
               seed=seed, bar=bar)
        state.pretrained.append({"seed": seed, "accuracy": _accuracy(torch, pretrained, test_x, test_y),
                                   "shifted_accuracy": _accuracy(torch, pretrained, shifted_test_x, test_y)})
        for record, (method, size, label) in zip(state.results, variants):
            start = time.perf_counter()
            model = _adapted(torch, pretrained, method, size, seed)
            trainable = _trainable(model)
            _train(torch, model, shifted_train_x, train_y, epochs=args.epochs, batch=args.batch,
                   lr=LEARNING_RATES.get(method, 0.0), seed=seed, bar=bar)
            model.eval()
            accuracy = _accuracy(torch, model, shifted_test_x, test_y)
            original = _accuracy(torch, model, test_x, test_y)
            error = _unitarity_error(model)
            # one append per list, together: an interrupt between them is cut back in _close
            record["trainable_parameters"] = trainable
            record["seeds"].append(seed)
            record["accuracy"].append(accuracy)
            record["original_task_accuracy"].append(original)
            record["seconds"].append(time.perf_counter() - start)
            if "unitarity_error" in record:
                record["unitarity_error"].append(error)
            bar.set_postfix_str(f"seed {seed} {label} {accuracy:.3f}", refresh=False)


def _close(results):
    """Cut every record's per-seed lists to the length they share (an
    interrupt can land between two appends) and add the summaries."""
    for record in results:
        keys = [key for key in ("seeds", "accuracy", "original_task_accuracy", "seconds", "unitarity_error")
                if key in record]
        done = min(len(record[key]) for key in keys)
        for key in keys:
            del record[key][done:]
        values = record["accuracy"]
        record["mean_accuracy"] = statistics.fmean(values) if values else None
        record["std_accuracy"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)


def _report(args, results, pretrained, interrupted):
    _close(results)

    def cell(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    rows = []
    for r in results:
        original = statistics.fmean(r["original_task_accuracy"]) if r["original_task_accuracy"] else None
        errors = r.get("unitarity_error")
        rows.append((r["label"], "-" if r["trainable_parameters"] is None else r["trainable_parameters"],
                     len(r["accuracy"]), cell(r["mean_accuracy"]), cell(r["std_accuracy"]), cell(original),
                     f"{max(errors):.1e}" if errors else "-"))
    print(_output.format_table(("method", "trainable", "seeds", "shifted accuracy", "std", "original task",
                                "U, V unitarity error"), rows))
    versions = {}
    for module in ("torch", "sklearn", "peft"):
        loaded = sys.modules.get(module)
        if loaded is not None:
            versions[module] = getattr(loaded, "__version__", None)
    record = _output.run_record(args, "adapt", {
        "settings": {"methods": args.methods, "shift": args.shift, "hidden": args.hidden,
                     "reflectors": args.reflectors, "lora_ranks": args.lora_ranks, "svd_ranks": args.svd_ranks,
                     "hra_ranks": args.hra_ranks,
                     "oft_block_sizes": args.oft_block_sizes, "pretrain_epochs": args.pretrain_epochs,
                     "epochs": args.epochs, "batch": args.batch, "seeds": args.seeds, "learning_rates": LEARNING_RATES,
                     "svd_unitary_lr_scale": SVD_UNITARY_LR_SCALE,
                     "quick": args.quick, "threads": args.threads},
        "status": "interrupted" if interrupted else "done",
        "skipped": [{"method": method, "reason": reason} for method, reason in args.skipped.items()],
        "pretrained": pretrained,
        "results": results,
    }, versions=versions)
    title = (f"digits, {args.hidden}-wide MLP, adapted to the "
             f"{'rotated' if args.shift == 'rotate' else 'pixel-permuted'} images")
    return _output.write_outputs(args, record, plot=(lambda path: _plot(path, results, title=title))
                         if any(r["accuracy"] for r in results) else None)


def _plot(path, results, *, title):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.8, 4.4), layout="constrained")
    axes = figure.subplots()
    markers = {"full": "s", "lora": "o", "hta": "D", "svd": "P", "hra": "^", "oft": "v"}
    for method in dict.fromkeys(r["method"] for r in results):
        points = [r for r in results if r["method"] == method and r["accuracy"]]
        if not points:
            continue
        if method == "none":
            axes.axhline(points[0]["mean_accuracy"], color="black", linestyle="--", linewidth=1,
                         label="pre-trained, not adapted")
            continue
        axes.errorbar([r["trainable_parameters"] for r in points], [r["mean_accuracy"] for r in points],
                      yerr=[r["std_accuracy"] for r in points], marker=markers.get(method, "o"), capsize=3,
                      label=method if method in ("full",) else {"lora": "LoRA", "hta": "HTA", "svd": "SVD (ProjUNN)",
                                                                   "hra": "HRA (PEFT)", "oft": "OFT (PEFT)"}[method])
        for r in points:
            axes.annotate(r["label"].split(" ", 1)[-1] if method != "full" else "", (r["trainable_parameters"],
                          r["mean_accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize="x-small")
    axes.set(title=title, xlabel="trainable parameters", ylabel="test accuracy on the new task", xscale="log",
             ylim=(0, 1.02))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    _output.save_figure(figure, path, dpi=120)
