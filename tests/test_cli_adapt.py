"""``unitary-lr adapt``."""

import json

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
pytest.importorskip("sklearn", reason="scikit-learn is not installed")

from unitary_lr._peft_support import peft_problem  # noqa: E402
from unitary_lr.cli import adapt, build_parser, main  # noqa: E402
from unitary_lr.cli._output import CommandError  # noqa: E402


def _reject(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_digits_and_their_shifts():
    train_x, train_y, test_x, test_y, shifted_train, shifted_test = adapt.digits("rotate")
    assert train_x.shape == (1198, 64) and test_x.shape == (599, 64) and train_x.dtype == torch.float32
    assert float(train_x.min()) == 0.0 and float(train_x.max()) == 1.0
    assert set(train_y.tolist()) == set(range(10)) and train_y.shape == (1198,) and test_y.shape == (599,)
    # a quarter turn of every 8 x 8 image: the same pixels, moved
    rotated = torch.rot90(train_x.reshape(-1, 8, 8), k=1, dims=(1, 2)).reshape(-1, 64)
    assert torch.equal(shifted_train, rotated)
    *_, permuted_train, _ = adapt.digits("permute")
    assert torch.equal(permuted_train.sort(dim=1).values, train_x.sort(dim=1).values)
    assert not torch.equal(permuted_train, train_x)


def test_lora_starts_as_the_layer():
    linear = torch.nn.Linear(6, 4)
    lora = adapt._LoRA.module(torch, linear, 2, torch.Generator().manual_seed(0))
    x = torch.randn(3, 6)
    assert torch.equal(lora(x), linear(x))
    assert adapt._trainable(lora) == 2 * (6 + 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_adapters_train_with_projunn_and_stay_orthonormal(dtype):
    """The SVD runs' optimizer is ProjUNN (U, V in its unitary group, at the
    scaled rate; s in the plain one), and the unitarity error the command
    reports is the float64 NumPy value of ||U^T U - I||_F / sqrt(r)."""
    import numpy as np

    from unitary_lr.torch import ProjUNN, SVDAdapter

    torch.manual_seed(0)
    pretrained = adapt._mlp(torch, 12).to(dtype)
    model = adapt._adapted(torch, pretrained, "svd", 3, seed=0)
    assert [type(model[int(name)]) for name in adapt.LAYERS] == [SVDAdapter] * 3
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = adapt._optimizer(torch, parameters, lr=0.1, seed=0)
    assert isinstance(optimizer, ProjUNN)
    unitary = [g for g in optimizer.param_groups if g["unitary"]]
    assert len(unitary) == 1 and len(unitary[0]["params"]) == 6 and unitary[0]["rank"] == 3
    assert unitary[0]["lr"] == pytest.approx(0.1 * adapt.SVD_UNITARY_LR_SCALE)
    initial = [model[int(name)].U.detach().clone() for name in adapt.LAYERS]
    x, y = torch.randn(32, 64, dtype=dtype), torch.randint(0, 10, (32,))
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapters = [model[int(name)] for name in adapt.LAYERS]
    assert all(float(a.s.detach().abs().max()) > 0 for a in adapters)  # it trained
    assert all(float((a.U.detach() - u).abs().max()) > 1e-3 for u, a in zip(initial, adapters))  # U moved
    reference = max(np.linalg.norm(F.T @ F - np.eye(F.shape[1])) / np.sqrt(F.shape[1])
                    for a in adapters for F in (a.U.detach().double().numpy(), a.V.detach().double().numpy()))
    assert adapt._unitarity_error(model) == pytest.approx(reference, rel=1e-6, abs=1e-15)
    assert reference < (1e-5 if dtype == torch.float32 else 1e-12)
    # a model without SVD adapters has no such error, and plain Adam as its optimizer
    assert adapt._unitarity_error(pretrained) is None
    assert type(adapt._optimizer(torch, list(pretrained.parameters()), lr=0.1, seed=0)) is torch.optim.Adam


def test_quick_run(tmp_path, capsys):
    out = tmp_path / "adapt"
    assert main(["adapt", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    record = json.loads(out.with_name("adapt.json").read_text(), parse_constant=_reject)
    assert record["status"] == "done" and record["experiment"] == "adapt"
    assert record["settings"]["seeds"] == [0] and record["settings"]["epochs"] == adapt.QUICK["epochs"]
    results = {r["label"]: r for r in record["results"]}
    expected = {"none", "full", "LoRA r=1", "LoRA r=4", "HTA j=1", "HTA j=4", "SVD r=1", "SVD r=4"}
    if peft_problem() is None:
        expected |= {"HRA r=2", "HRA r=8", "OFT block 4", "OFT block 8"}
        assert record["skipped"] == []
    else:
        assert {s["method"] for s in record["skipped"]} == {"hra", "oft"}
    assert set(results) == expected
    for r in results.values():
        assert r["seeds"] == [0] and len(r["accuracy"]) == 1
        assert all(0 <= a <= 1 for a in r["accuracy"] + r["original_task_accuracy"])
        assert isinstance(r["trainable_parameters"], int)
    hidden = record["settings"]["hidden"]
    assert results["none"]["trainable_parameters"] == 0
    assert results["full"]["trainable_parameters"] == 64 * hidden + hidden * hidden + hidden * 10 + 2 * hidden + 10
    # HTA: (n_out + n_in) j + min(n_out, n_in) per layer
    assert results["HTA j=1"]["trainable_parameters"] == (hidden + 64) + 64 + 2 * hidden + hidden + (10 + hidden) + 10
    assert results["LoRA r=4"]["trainable_parameters"] == 4 * ((hidden + 64) + 2 * hidden + (10 + hidden))
    # SVD: (n_out + n_in + 1) r per layer, next to LoRA's (n_out + n_in) r
    for r in (1, 4):
        assert results[f"SVD r={r}"]["trainable_parameters"] == r * ((hidden + 64 + 1) + (2 * hidden + 1) + (10 + hidden + 1))
        # trained by ProjUNN: U and V orthonormal to float32 rounding after every epoch's steps
        assert len(results[f"SVD r={r}"]["unitarity_error"]) == 1
        assert 0 <= results[f"SVD r={r}"]["unitarity_error"][0] < 1e-5
    assert all("unitarity_error" not in r for label, r in results.items() if not label.startswith("SVD"))
    # the shift is real: the pre-trained network does well on its task and badly on the rotated one
    pretrained = record["pretrained"][0]
    assert pretrained["accuracy"] > 0.85 and pretrained["shifted_accuracy"] < 0.4
    baseline = results["none"]["mean_accuracy"]
    assert baseline == pytest.approx(pretrained["shifted_accuracy"])
    for label in ("HTA j=1", "HTA j=4", "SVD r=4"):
        assert results[label]["mean_accuracy"] > baseline + 0.3, label
    assert out.with_name("adapt.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "shifted accuracy" in printed and "HTA j=4" in printed


def test_methods_and_sizes_choose_the_runs(tmp_path):
    out = tmp_path / "few"
    argv = ["adapt", "--methods", "none", "hta", "--reflectors", "2", "--pretrain-epochs", "2", "--epochs", "1",
            "--seeds", "3", "4", "--hidden", "16", "--no-progress", "--no-plot", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads(out.with_name("few.json").read_text())
    assert [r["label"] for r in record["results"]] == ["none", "HTA j=2"]
    assert record["results"][1]["seeds"] == [3, 4] and len(record["results"][1]["accuracy"]) == 2
    assert record["results"][1]["std_accuracy"] >= 0
    assert not out.with_name("few.png").exists()


def test_quick_fills_only_what_is_not_given(tmp_path):
    def settings(*arguments):
        args = build_parser().parse_args(["adapt", *arguments, "--methods", "hta", "--out", str(tmp_path / "x")])
        adapt._validate(args)
        return args.pretrain_epochs, args.epochs, args.seeds

    assert settings() == (40, 30, [0, 1, 2])
    assert settings("--quick") == (15, 8, [0])
    assert settings("--quick", "--epochs", "3", "--seeds", "5", "5", "6") == (15, 3, [5, 6])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--hidden", "0"], "--hidden must be >= 1, got 0"),
        (["--seeds", "-1"], "--seeds must be >= 0, got -1"),
        (["--reflectors", "11"], "--reflectors must lie in [1, 10], got 11"),
        (["--lora-ranks", "0"], "--lora-ranks must lie in [1, 10], got 0"),
        (["--svd-ranks", "11"], "--svd-ranks must lie in [1, 10], got 11"),
        (["--hra-ranks", "3"], "--hra-ranks must be even (HRA's initialization pairs its reflections), got 3"),
        (["--oft-block-sizes", "5"], "--oft-block-sizes must be >= 2 and divide 64 and --hidden = 64, got 5"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--out", str("{tmp}/")], "--out must be a file path, got the directory"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, arguments, message):
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    argv = ["adapt", "--no-progress", "--no-plot", *arguments]
    if "--out" not in arguments:
        argv += ["--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unitary-lr adapt: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(("methods", "sizes"), [(["hta"], ["--reflectors", "3"]), (["lora", "hta"], []),
                                               (["svd"], ["--svd-ranks", "2"]), (["none", "full"], [])])
def test_only_the_methods_that_run_have_their_sizes_checked(tmp_path, methods, sizes):
    """At --hidden 3 the defaults of the methods left out (--lora-ranks 4,
    --hra-ranks 8, --oft-block-sizes 8) stopped a run that does not use
    them; a method that runs is still held to its sizes."""
    def validate(*arguments):
        args = build_parser().parse_args(["adapt", "--hidden", "3", *arguments, "--out", str(tmp_path / "x")])
        adapt._validate(args)
        return args.methods

    if methods == ["lora", "hta"]:  # lora's default rank 4 is too large here
        with pytest.raises(CommandError, match=r"--lora-ranks must lie in \[1, 3\], got 4"):
            validate("--methods", *methods, "--reflectors", "2")
        methods, sizes = methods, ["--lora-ranks", "2", "--reflectors", "2"]
    assert validate("--methods", *methods, *sizes) == methods


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--methods", "prompt-tuning"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'prompt-tuning'" in capsys.readouterr().err


def test_peft_methods_without_peft(tmp_path, capsys, monkeypatch):
    """Asked for by name, HRA and OFT without a usable PEFT are an error; by
    default they are skipped, with the reason on stderr and in the JSON."""
    from unitary_lr import _peft_support

    monkeypatch.setattr(_peft_support, "peft_problem", lambda: "PEFT is not installed: pip install 'unitary-lr[peft]'")
    assert main(["adapt", "--methods", "hta", "oft", "--no-progress", "--no-plot", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error: --methods oft needs PEFT: PEFT is not installed" in err and err.count("\n") == 1
    args = build_parser().parse_args(["adapt", "--out", str(tmp_path / "y")])
    adapt._validate(args)
    assert "hra" not in args.methods and "oft" not in args.methods and set(args.skipped) == {"hra", "oft"}


def test_interrupted_at_any_moment_leaves_whole_results(tmp_path):
    from _interrupts import moments, run_with_interrupt

    from unitary_lr.cli._session import execute  # every subcommand's work runs in it

    out = tmp_path / "adapt"
    argv = ["adapt", "--methods", "none", "lora", "hta", "svd", "--lora-ranks", "1", "--reflectors", "1",
            "--svd-ranks", "1", "--hidden", "8",
            "--pretrain-epochs", "1", "--epochs", "1", "--seeds", "0", "1", "--no-progress", "--no-plot",
            "--out", str(out)]
    for at in moments(main, argv, execute, 12):
        out.with_name("adapt.json").unlink(missing_ok=True)
        status, _ = run_with_interrupt(main, argv, execute, at)
        assert status == 130, at
        assert torch.is_grad_enabled(), at  # nothing of the run's state is left behind
        record = json.loads(out.with_name("adapt.json").read_text(), parse_constant=_reject)
        assert record["status"] == "interrupted", at
        for r in record["results"]:
            keys = ("seeds", "accuracy", "original_task_accuracy", "seconds") + ("unitarity_error",) * (r["method"] == "svd")
            lengths = {len(r[key]) for key in keys}
            assert len(lengths) == 1, (at, r)
