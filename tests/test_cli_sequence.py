"""``unitary-lr copy`` and ``unitary-lr adding``."""

import json
import math

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

from unitary_lr.cli import main  # noqa: E402
from unitary_lr.cli import sequence  # noqa: E402

TINY = ["--T", "6", "--hidden", "8", "--steps", "12", "--batch", "8", "--eval-every", "4", "--no-progress"]


def read(prefix):
    return json.loads(prefix.with_name(prefix.name + ".json").read_text())


def test_copy_compares_ranks_variants_and_baselines(tmp_path, capsys):
    out = tmp_path / "copy"
    assert main(["copy", *TINY, "--ranks", "1", "2", "--variants", "tangent", "direct",
                 "--models", "unitary", "lstm", "rnn", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "projUNN-D, k = 2" in printed and "LSTM" in printed and "memoryless baseline: 0.7998" in printed
    record = read(out)
    assert record["baseline"] == pytest.approx(10 * math.log(8) / (6 + 20))
    assert record["status"] == "done" and record["settings"]["T"] == 6
    labels = [r["label"] for r in record["results"]]
    assert labels == ["projUNN-T, k = 1", "projUNN-T, k = 2", "projUNN-D, k = 1", "projUNN-D, k = 2", "LSTM", "RNN"]
    for r in record["results"]:
        assert len(r["train_loss"]) == 12 and r["test_steps"] == [4, 8, 12]
        assert all(math.isfinite(v) for v in r["train_loss"] + r["test_loss"])
        if r["model"] == "unitary":
            assert r["unitarity_error"] < 1e-5  # float32
    png = out.with_name("copy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("task", ["copy", "adding"])
def test_record_names_the_torch_version(tmp_path, task):
    """The record holds the versions of the libraries the run used (torch's was left out)."""
    out = tmp_path / task
    assert main([task, *TINY, "--steps", "1", "--no-plot", "--out", str(out)]) == 0
    environment = read(out)["environment"]
    assert environment["torch"] == torch.__version__ and environment["numpy"] == __import__("numpy").__version__


def test_adding_data_and_baseline():
    task = sequence.AddingTask(10)
    x, y = task.batch(torch, 500, torch.Generator().manual_seed(0), "cpu")
    assert tuple(x.shape) == (500, 10, 2)
    marks = x[..., 1]
    assert torch.all(marks.sum(dim=1) == 2)
    assert torch.all(marks[:, :5].sum(dim=1) == 1) and torch.all(marks[:, 5:].sum(dim=1) == 1)
    torch.testing.assert_close((x[..., 0] * marks).sum(dim=1), y)
    # always answering 1 scores the variance of the sum of two uniforms, 1/6
    assert float(((y - 1) ** 2).mean()) == pytest.approx(task.baseline, rel=0.15)


def test_cosine_schedule_decays_every_groups_lr(tmp_path, monkeypatch):
    """--lr-schedule cosine: the lr of both groups follows the cosine, keeping
    the unitary group's ratio, and falls to 0 over the run."""
    from unitary_lr.torch import ProjUNN

    seen = []
    step = ProjUNN.step

    def recording_step(self, closure=None):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, closure)

    monkeypatch.setattr(ProjUNN, "step", recording_step)
    out = tmp_path / "cosine"
    assert main(["adding", *TINY, "--lr", "0.01", "--unitary-lr-ratio", "4", "--lr-schedule", "cosine",
                 "--no-plot", "--out", str(out)]) == 0
    assert read(out)["settings"]["lr_schedule"] == "cosine"
    expected = [0.01 * (1 + math.cos(math.pi * t / 12)) / 2 for t in range(12)]
    assert [lrs[0] for lrs in seen] == pytest.approx(expected, abs=1e-15)
    assert [lrs[1] for lrs in seen] == pytest.approx([lr / 4 for lr in expected], abs=1e-15)


def test_copy_data():
    task = sequence.CopyTask(5)
    x, y = task.batch(torch, 4, torch.Generator().manual_seed(0), "cpu")
    assert tuple(x.shape) == (4, 25, 10) and tuple(y.shape) == (4, 25)
    symbols = x.argmax(dim=-1)
    assert torch.all((symbols[:, :10] >= 1) & (symbols[:, :10] <= 8))
    assert torch.all(symbols[:, 14] == 9) and torch.all(symbols[:, 10:14] == 0) and torch.all(symbols[:, 15:] == 0)
    assert torch.equal(y[:, 15:], symbols[:, :10]) and torch.all(y[:, :15] == 0)


@pytest.mark.slow
def test_quick_copy_gets_below_a_tenth_of_its_baseline(tmp_path):
    """--quick (T = 100) must get below a tenth of the memoryless baseline."""
    out = tmp_path / "quick"
    assert main(["copy", "--quick", "--threads", "1", "--no-progress", "--no-plot", "--out", str(out)]) == 0
    record = read(out)
    assert record["settings"]["T"] == 100
    assert record["results"][0]["final_test_loss"] < record["baseline"] / 10


@pytest.mark.slow
def test_quick_adding_learns_well_below_its_baseline(tmp_path):
    out = tmp_path / "quick"
    assert main(["adding", "--quick", "--threads", "1", "--no-progress", "--no-plot", "--out", str(out)]) == 0
    record = read(out)
    assert record["results"][0]["final_test_loss"] < record["baseline"] / 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["copy", "--T", "0"], "--T must be >= 1, got 0"),
        (["adding", "--T", "1"], "--T must be >= 2, got 1"),
        (["copy", "--hidden", "1"], "--hidden must be >= 2, got 1"),
        (["copy", "--hidden", "8", "--ranks", "9"], "--ranks must lie in [1, hidden = 8], got 9"),
        (["copy", "--lr", "0"], "--lr must be finite and > 0, got 0.0"),
        (["adding", "--device", "cuda:7"], "device 'cuda:7' is not available to torch here"),
        (["copy", "--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert main([*arguments, "--steps", "2", "--no-progress", "--no-plot", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_interrupt_keeps_the_partial_curve(tmp_path, monkeypatch):
    from unitary_lr.torch import ProjUNN

    real_step = ProjUNN.step
    calls = {"n": 0}

    def step_then_interrupt(self, closure=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_step(self, closure)

    monkeypatch.setattr(ProjUNN, "step", step_then_interrupt)
    out = tmp_path / "cut"
    assert main(["copy", *TINY, "--no-plot", "--out", str(out)]) == 130
    record = read(out)
    assert record["status"] == "interrupted" and len(record["results"][0]["train_loss"]) == 5
    assert record["results"][0]["test_steps"] == [4]


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    """A job scheduler's SIGTERM writes the partial results, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "term"
    process = subprocess.Popen([sys.executable, "-m", "unitary_lr", "copy", "--T", "50", "--hidden", "16",
                                "--steps", "100000", "--eval-every", "5", "--no-progress", "--no-plot",
                                "--threads", "1", "--out", str(out)])
    json_path = out.with_name("term.json")
    deadline = time.time() + 120
    while not json_path.exists() and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    record = json.loads(json_path.read_text())
    assert record["status"] == "interrupted" and record["results"][0]["train_loss"]


def strict_json(path):
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.mark.parametrize("task", ["copy", "adding"])
def test_interrupt_during_an_evaluation(tmp_path, monkeypatch, task):
    """Ctrl-C while the test set is evaluated: exit 130, a plot, and a JSON
    whose test steps and losses pair up (not a ValueError traceback)."""
    cls = sequence.CopyTask if task == "copy" else sequence.AddingTask
    real_loss, evaluations = cls.loss, {"n": 0}

    def loss(self, torch_, outputs, y):
        if not torch.is_grad_enabled():  # the test set, under no_grad
            evaluations["n"] += 1
            if evaluations["n"] == 2:
                raise KeyboardInterrupt
        return real_loss(self, torch_, outputs, y)

    monkeypatch.setattr(cls, "loss", loss)
    out = tmp_path / "cut"
    assert main([task, *TINY, "--out", str(out)]) == 130
    record = strict_json(out.with_name("cut.json"))
    assert record["status"] == "interrupted"
    result = record["results"][0]
    assert result["test_steps"] == [4] and len(result["test_loss"]) == 1
    assert result["final_test_loss"] == result["test_loss"][0] and result["steps_done"] == 8
    assert out.with_name("cut.png").read_bytes()[:4] == b"\x89PNG"


def test_copy_interrupted_at_any_moment_leaves_whole_results(tmp_path):
    from _interrupts import moments, run_with_interrupt

    from unitary_lr.cli._session import execute  # every subcommand's work runs in it

    out = tmp_path / "copy"
    argv = ["copy", "--T", "3", "--hidden", "4", "--steps", "4", "--batch", "4", "--eval-every", "2",
            "--models", "unitary", "rnn", "--no-progress", "--no-plot", "--out", str(out)]
    for at in moments(main, argv, execute, 25):
        out.with_name("copy.json").unlink(missing_ok=True)
        status, _ = run_with_interrupt(main, argv, execute, at)
        assert status == 130, at
        record = strict_json(out.with_name("copy.json"))
        assert record["status"] == "interrupted", at
        for r in record["results"]:
            assert len(r["train_loss"]) == r["steps_done"], (at, r)
            assert len(r["test_steps"]) == len(r["test_loss"]) and set(r["test_steps"]) <= {2, 4}, (at, r)
            assert r["final_test_loss"] == (r["test_loss"][-1] if r["test_loss"] else None), (at, r)
        # nothing global is left behind: the evaluations' eager stance (see
        # _compile.eager) is lifted, and torch.compile still compiles
        graphs = []
        add_one = torch.compile(lambda x: x + 1, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
        torch.compiler.reset()
        add_one(torch.zeros(2))
        assert len(graphs) == 1, at


def test_a_second_ctrl_c_does_not_cut_the_outputs(tmp_path, monkeypatch):
    """Ctrl-C while the results are written (a second one, or one just as the
    run ends) is noted: the outputs are completed, and the exit status is 130."""
    import os
    import signal

    real_plot = sequence._plot

    def plot_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(sequence, "_plot", plot_interrupted)
    out = tmp_path / "late"
    # the handler before the run (SIG_IGN, not Python's default, where the
    # tests run in a background job of a non-interactive shell)
    before = signal.getsignal(signal.SIGINT)
    try:
        status = main(["adding", *TINY, "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C during the plot cut the outputs")
    assert status == 130
    assert strict_json(out.with_name("late.json"))["results"][0]["steps_done"] == 12
    assert out.with_name("late.png").read_bytes()[:4] == b"\x89PNG"
    assert signal.getsignal(signal.SIGINT) is before  # given back


def test_threads_apply_before_the_run_and_are_restored(tmp_path, monkeypatch):
    before, seen = torch.get_num_threads(), []
    real = sequence.torch_session

    def first_work(args):
        seen.append(torch.get_num_threads())
        return real(args)

    monkeypatch.setattr(sequence, "torch_session", first_work)
    for threads in ("1", "3"):
        assert main(["adding", *TINY, "--no-plot", "--threads", threads, "--out", str(tmp_path / "t")]) == 0
    assert main(["adding", *TINY, "--no-plot", "--out", str(tmp_path / "t")]) == 0  # the default: 1
    assert seen == [1, 3, 1] and torch.get_num_threads() == before


@pytest.mark.parametrize("task", ["copy", "adding"])
def test_quick_fills_only_what_is_not_given(tmp_path, task):
    from unitary_lr.cli import build_parser

    quick = sequence.TASKS[task]["quick"]
    parse = build_parser().parse_args
    args = parse([task, "--quick", "--T", "7", "--lr", "0.5", "--out", str(tmp_path / "x")])
    assert sequence._settings(args) == (7, quick["hidden"], quick["steps"]) and args.lr == 0.5
    args = parse([task, "--quick", "--hidden", "9", "--steps", "3", "--optimizer", "sgd", "--out", str(tmp_path / "x")])
    assert sequence._settings(args) == (quick["T"], 9, 3) and args.optimizer == "sgd"


# torch's inductor imports a deprecated torch.jit helper of its own, and
# torch.compile reads the .grad of the non-leaf states it is given: not ours to fix
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
@pytest.mark.parametrize("task", ["copy", "adding"])
def test_compile_gives_the_eager_losses(tmp_path, task):
    """--compile captures the unitary RNN's loop (in chunks of --compile-steps
    time steps, forward and backward); the optimizer stays eager. Same seed,
    same data: the same losses to float32 rounding (the compiled kernels
    fuse and reorder sums, so not bit for bit). The sequences (22 and 2
    steps) in chunks of at most 8: 8, 8 and 6, and one of 2."""
    tiny = ["--T", "2", "--hidden", "6", "--steps", "4", "--batch", "4", "--eval-every", "2",
            "--no-progress", "--no-plot"]
    records = []
    for flags in ([], ["--compile", "--compile-steps", "8"]):
        out = tmp_path / f"{task}{len(flags)}"
        assert main([task, *tiny, *flags, "--out", str(out)]) == 0
        records.append(read(out))
    eager, compiled = records
    assert eager["settings"]["compile"] is None and compiled["settings"]["compile"] == "default"  # on the CPU
    assert eager["settings"]["compile_steps"] is None and compiled["settings"]["compile_steps"] == 8
    e, c = eager["results"][0], compiled["results"][0]
    assert len(c["train_loss"]) == 4 and c["test_steps"] == [2, 4]
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-5)
    assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-5)
    assert c["unitarity_error"] < 1e-5
    for r in (e, c):  # the first step (compile time) apart from the later steps' median
        assert r["first_step_seconds"] > 0 and r["median_step_seconds"] > 0
    assert c["first_step_seconds"] > c["median_step_seconds"]


def test_compile_mode_follows_the_device():
    from unitary_lr.cli._compile import compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_mode(None, cuda) is None
    assert compile_mode("auto", cpu) == "default"
    assert compile_mode("auto", cuda) == "reduce-overhead"  # CUDA graphs: the loop is launch-bound there
    assert compile_mode("default", cuda) == "default"


def test_compile_option_parses(tmp_path):
    from unitary_lr.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["copy", "--out", "x"]).compile is None
    assert parse(["copy", "--compile", "--quick"]).compile == "auto"
    assert parse(["adding", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse(["copy", "--out", "x"]).compile_steps is None  # 32 with --compile (_settings)
    assert parse(["adding", "--compile", "--compile-steps", "5"]).compile_steps == 5
    args = parse(["copy", "--compile", "--out", "x"])
    sequence._settings(args)
    assert args.compile_steps == 32


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_compile_steps_below_one_is_refused(tmp_path, capsys, steps):
    assert main(["copy", "--compile", "--compile-steps", steps, "--steps", "1", "--out", str(tmp_path / "x")]) != 0
    assert f"--compile-steps must be >= 1, got {steps}" in capsys.readouterr().err


def test_compile_steps_without_compile_is_refused(tmp_path, capsys):
    """A chunk length with nothing to compile is a mistake, not a no-op."""
    assert main(["adding", "--compile-steps", "8", "--steps", "1", "--out", str(tmp_path / "x")]) != 0
    assert "--compile-steps 8 needs --compile" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cuda_only_calls_are_made_only_for_cuda():
    """No GPU here: the CUDA-only calls are checked on a stand-in for torch."""
    from types import SimpleNamespace

    from unitary_lr.cli._compile import mark_step_begin, synchronize

    calls = []
    fake = SimpleNamespace(cuda=SimpleNamespace(synchronize=lambda device: calls.append(("sync", device))),
                           compiler=SimpleNamespace(cudagraph_mark_step_begin=lambda: calls.append("step")))
    synchronize(fake, torch.device("cpu"))
    mark_step_begin(fake, "default")
    mark_step_begin(fake, None)
    assert calls == []
    synchronize(fake, torch.device("cuda", 1))
    mark_step_begin(fake, "reduce-overhead")
    assert calls == [("sync", torch.device("cuda", 1)), "step"]
