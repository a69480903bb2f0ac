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
    """The issue's target for --quick (T = 100): a tenth of the memoryless baseline."""
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
