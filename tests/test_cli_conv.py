"""``unitary-lr conv``."""

import json
import math

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.cli import conv, main  # noqa: E402


def test_gratings_are_oriented_by_class():
    images, labels = conv.gratings(torch, 400, 16, 0.0, torch.Generator().manual_seed(0))
    assert tuple(images.shape) == (400, 1, 16, 16) and set(labels.tolist()) == {0, 1, 2, 3}
    # without noise, the orientation of the image's energy in the Fourier plane gives its class
    spectrum = torch.fft.fft2(images[:, 0].double()).abs()
    spectrum[:, 0, 0] = 0
    flat = spectrum.reshape(400, -1).argmax(dim=1)
    i, j = flat // 16, flat % 16
    i, j = torch.where(i > 8, i - 16, i), torch.where(j > 8, j - 16, j)
    angle = torch.remainder(torch.atan2(i.double(), j.double()), math.pi)
    predicted = torch.round(angle / (math.pi / 4)).long() % 4
    assert float((predicted == labels).double().mean()) > 0.9


@pytest.mark.slow
def test_quick_run_trains_and_stays_orthogonal(tmp_path, capsys):
    out = tmp_path / "conv"
    assert main(["conv", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    record = json.loads(out.with_name("conv.json").read_text())
    orthogonal, unconstrained = record["results"]
    assert orthogonal["run"] == "orthogonal" and unconstrained["run"] == "unconstrained"
    assert orthogonal["final_test_accuracy"] > 0.7  # chance is 0.25
    assert orthogonal["unitarity_error"] < 1e-5  # float32: ||conv x|| = ||x||
    assert unconstrained["unitarity_error"] > 1e-3  # the same layer, free to leave the group
    assert out.with_name("conv.png").read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--channels", "7"], "--channels must be even (MaxMin sorts channel pairs), got 7"),
        (["--depth", "0"], "--depth must be >= 1, got 0"),
        (["--rank", "9"], "--rank must lie in [1, channels = 8], got 9"),
        (["--lr", "-1"], "--lr must be finite and > 0, got -1.0"),
        (["--device", "cuda:5"], "device 'cuda:5' is not available to torch here"),
    ],
)
def test_bad_settings(tmp_path, capsys, arguments, message):
    assert main(["conv", *arguments, "--steps", "1", "--no-progress", "--no-plot", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_quick_fills_only_what_is_not_given(tmp_path):
    """--quick must not override an explicit --steps, --depth or --size."""
    from unitary_lr.cli import build_parser

    def settings(*arguments):
        args = build_parser().parse_args(["conv", *arguments, "--out", str(tmp_path / "x")])
        conv._validate(args)
        return args.depth, args.size, args.steps

    assert settings() == (32, 8, 200)
    assert settings("--quick") == (8, 8, 150)
    assert settings("--quick", "--steps", "3", "--depth", "2", "--size", "6") == (2, 6, 3)
    assert settings("--quick", "--size", "12") == (8, 12, 150)


def test_record_names_the_torch_version(tmp_path):
    """The record holds the versions of the libraries the run used (torch's was left out)."""
    out = tmp_path / "conv"
    argv = ["conv", "--depth", "2", "--channels", "2", "--rank", "1", "--size", "4", "--steps", "1", "--batch", "4",
            "--no-progress", "--no-plot", "--out", str(out)]
    assert main(argv) == 0
    environment = json.loads(out.with_name("conv.json").read_text())["environment"]
    assert environment["torch"] == torch.__version__


def test_conv_interrupted_at_any_moment_leaves_whole_results(tmp_path):
    from _interrupts import moments, run_with_interrupt

    from unitary_lr.cli._session import execute  # every subcommand's work runs in it

    def reject(constant):
        raise ValueError(constant)

    out = tmp_path / "conv"
    argv = ["conv", "--depth", "2", "--channels", "2", "--rank", "1", "--size", "4", "--steps", "3", "--batch", "4",
            "--no-progress", "--no-plot", "--out", str(out)]
    for at in moments(main, argv, execute, 20):
        out.with_name("conv.json").unlink(missing_ok=True)
        status, _ = run_with_interrupt(main, argv, execute, at)
        assert status == 130, at
        record = json.loads(out.with_name("conv.json").read_text(), parse_constant=reject)
        assert record["status"] == "interrupted", at
        for r in record["results"]:
            assert len(r["train_loss"]) == len(r["first_layer_gradient"]), (at, r)
            assert len(r["test_steps"]) == len(r["test_accuracy"]), (at, r)



def test_conv_interrupted_inside_no_grad_leaves_gradients_on(tmp_path):
    """Ctrl-C just after ``torch.no_grad().__enter__`` has switched gradients
    off, before the ``with`` statement can call ``__exit__``: the run still
    reports, and gradients are on again once it returns."""
    from _interrupts import run_with_interrupt_on_return

    enter = torch.autograd.grad_mode.no_grad.__enter__.__code__
    out = tmp_path / "conv"
    argv = ["conv", "--depth", "2", "--channels", "2", "--rank", "1", "--size", "4", "--steps", "3", "--batch", "4",
            "--no-progress", "--no-plot", "--out", str(out)]
    status, entered = run_with_interrupt_on_return(main, argv, enter, 0)
    assert status == 0 and entered >= 4, entered  # test accuracy and operator error, for both runs
    for at in range(1, entered + 1):
        out.with_name("conv.json").unlink(missing_ok=True)
        try:
            status, _ = run_with_interrupt_on_return(main, argv, enter, at)
            grad_enabled = torch.is_grad_enabled()
        finally:
            torch.set_grad_enabled(True)  # a failure here must not spill into the other tests
        assert status == 130 and grad_enabled, (at, status)
        record = json.loads(out.with_name("conv.json").read_text())
        assert record["status"] == "interrupted", at


# torch's inductor imports a deprecated torch.jit helper of its own, and notes
# that it leaves complex operators (the Fourier-domain product) to eager kernels
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex:UserWarning")
def test_compile_gives_the_eager_losses(tmp_path):
    argv = ["conv", "--depth", "2", "--channels", "4", "--size", "4", "--steps", "3", "--batch", "4",
            "--runs", "orthogonal", "--no-progress", "--no-plot"]
    records = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"conv{len(flags)}"
        assert main([*argv, *flags, "--out", str(out)]) == 0
        records.append(json.loads(out.with_name(out.name + ".json").read_text()))
    eager, compiled = (record["results"][0] for record in records)
    assert records[1]["settings"]["compile"] == "default" and records[0]["settings"]["compile"] is None
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-5)
    assert compiled["first_layer_gradient"] == pytest.approx(eager["first_layer_gradient"], rel=1e-4)
    assert compiled["test_accuracy"] == eager["test_accuracy"]
    assert compiled["first_step_seconds"] > compiled["median_step_seconds"] > 0
