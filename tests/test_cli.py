import json
import subprocess
import sys

import numpy as np
import pytest

from unitary_lr.cli import main
from unitary_lr.cli import toy as toy_module

SMALL = ["toy", "--n", "16", "--batch", "8", "--steps", "40", "--no-progress"]


def read(prefix):
    return json.loads(prefix.with_name(prefix.name + ".json").read_text())


def test_toy_learns_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "run" / "toy"
    assert main([*SMALL, "--ranks", "1", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank k" in printed and "unitarity error" in printed and "wrote" in printed
    record = read(out)
    assert record["command"].startswith("unitary-lr toy --n 16")
    assert record["settings"]["lr"] == 4.0  # batch / 2
    assert record["interrupted"] is False
    first, second = record["results"]
    for result in (first, second):
        assert len(result["loss"]) == 41
        assert 1.0 < result["loss"][0] < 3.0  # ||W - U||^2 / n for two random unitaries
        assert result["final_loss"] < 0.5 * result["loss"][0]
        assert result["unitarity_error"] < 1e-13
        assert result["ms_per_step"] > 0
    assert second["final_loss"] < 1e-3 * first["final_loss"]  # larger k learns faster
    png = out.with_name("toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_toy_same_curves_on_every_backend(backend, tmp_path):
    """The toy is plain Array API code: with the same seed every backend follows
    NumPy's curve."""
    options = {"numpy": [], "torch": ["--backend", "torch"], "jax": ["--backend", "jax"],
               "cupy": ["--backend", "cupy"],
               "array_api_strict:device1": ["--backend", "array_api_strict", "--device", "device1"],
               "array_api_strict:no_float64": ["--backend", "array_api_strict", "--device", "no_float64"]}[backend.name]
    dtype = "complex128" if backend.has_float64 else "complex64"
    common = [*SMALL, "--steps", "15", "--ranks", "2", "--dtype", dtype, "--no-plot"]
    assert main([*common, *options, "--out", str(tmp_path / "here")]) == 0
    assert main([*common, "--out", str(tmp_path / "numpy")]) == 0
    here, reference = read(tmp_path / "here"), read(tmp_path / "numpy")
    np.testing.assert_allclose(here["results"][0]["loss"], reference["results"][0]["loss"],
                               rtol=1e-9 if backend.has_float64 else 1e-3)


def test_toy_dense_gradient_and_direct_variant_agree_with_factors(tmp_path):
    common = [*SMALL, "--ranks", "3", "--no-plot", "--dtype", "float64"]
    for variant in ("tangent", "direct"):
        main([*common, "--variant", variant, "--out", str(tmp_path / "factors")])
        main([*common, "--variant", variant, "--dense-gradient", "--out", str(tmp_path / "dense")])
        factors, dense = read(tmp_path / "factors"), read(tmp_path / "dense")
        # the same sketch draws on G = a b^H, formed or not
        np.testing.assert_allclose(factors["results"][0]["loss"], dense["results"][0]["loss"], rtol=1e-8)
        assert factors["results"][0]["final_loss"] < 0.5 * factors["results"][0]["loss"][0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--ranks", "0"], "--ranks must lie in [1, n = 16], got 0"),
        (["--ranks", "17"], "--ranks must lie in [1, n = 16], got 17"),
        (["--lr", "-1"], "--lr must be finite and > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be finite and > 0, got nan"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--backend", "torch", "--device", "nowhere:3"], "device 'nowhere:3' is not available to torch here"),
        (["--backend", "array_api_strict", "--device", "no_float64"],
         "dtype complex128 is not available on device"),
    ],
)
def test_toy_bad_settings_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert main([*SMALL, "--no-plot", *arguments, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unitary-lr toy: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_toy_n_below_two_and_unknown_flags(capsys):
    assert main(["toy", "--n", "1"]) == 2
    assert "--n must be >= 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--no-such-flag"])
    assert exit_info.value.code == 2


def test_interrupt_keeps_partial_curve(tmp_path, monkeypatch):
    """Ctrl-C during a run writes what was done and exits 130."""
    real_step = toy_module.ProjUNN.step
    calls = {"n": 0}

    def step_then_interrupt(self, W, G):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_step(self, W, G)

    monkeypatch.setattr(toy_module.ProjUNN, "step", step_then_interrupt)
    assert main([*SMALL, "--ranks", "2", "--no-plot", "--out", str(tmp_path / "cut")]) == 130
    record = read(tmp_path / "cut")
    assert record["interrupted"] is True
    assert len(record["results"][0]["loss"]) == 6


def test_module_entry_point_and_version():
    result = subprocess.run([sys.executable, "-m", "unitary_lr", "--help"], capture_output=True, text=True, check=True)
    assert "toy" in result.stdout
    result = subprocess.run([sys.executable, "-m", "unitary_lr", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("unitary-lr ")
