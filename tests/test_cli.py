import json
import math
import subprocess
import sys
from pathlib import Path

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
    options = backend.cli
    dtype = "complex128" if backend.has_float64 else "complex64"
    common = [*SMALL, "--steps", "15", "--ranks", "2", "--dtype", dtype, "--no-plot"]
    assert main([*common, *options, "--out", str(tmp_path / "here")]) == 0
    assert main([*common, "--out", str(tmp_path / "numpy")]) == 0
    here, reference = read(tmp_path / "here"), read(tmp_path / "numpy")
    np.testing.assert_allclose(here["results"][0]["loss"], reference["results"][0]["loss"],
                               rtol=1e-9 if backend.has_float64 else 1e-3)
    # the record names the version of the library that ran it (torch's and jax's were left out)
    library = backend.name.partition(":")[0]
    assert here["environment"][library] == __import__(library).__version__


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


# --- outputs, interrupts and threads, for every subcommand -------------------------------------

def strict_json(path):
    """The file parsed as JSON proper: NaN and Infinity are not JSON."""
    def reject(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def _bad_paths(tmp_path):
    (tmp_path / "a-file").write_text("")
    for name in ("taken.json", "taken.png", "taken"):  # the file an option would write is a folder
        (tmp_path / name).mkdir()
    paths = {
        "empty": ("", "must name a file, got ''"),
        "dot": (".", "must be a file path, got the directory '.'"),
        "root": ("/", "must be a file path, got the directory '/'"),
        "trailing separator": (str(tmp_path / "folder") + "/", "must be a file path, got the directory"),
        "parent is a file": (str(tmp_path / "a-file" / "out"), f"'{tmp_path / 'a-file'}' is a file, not a folder"),
        # --out is a prefix, so its message names the file; --json and --plot name the file itself
        "taken by a folder": (str(tmp_path / "taken"), ("a folder of that name exists", "got the directory")),
    }
    if Path("/proc/self").is_dir():  # a folder that cannot be created, even by root
        paths["folder cannot be created"] = ("/proc/unitary-lr-test/out", "cannot write '/proc/unitary-lr-test/out")
    return paths


# (arguments, option, module whose first piece of work is patched to fail)
COMMANDS = {
    "toy": (["toy", "--n", "4", "--ranks", "1", "--steps", "1"], "--out", "toy", "load_backend"),
    "copy": (["copy", "--T", "3", "--hidden", "4", "--steps", "1"], "--out", "sequence", "torch_session"),
    "adding": (["adding", "--T", "3", "--hidden", "4", "--steps", "1"], "--out", "sequence", "torch_session"),
    "conv": (["conv", "--depth", "1", "--steps", "1"], "--out", "conv", "torch_session"),
    "bench --json": (["bench", "--sizes", "4", "--repeat", "1"], "--json", "bench", "load_backend"),
    "bench --plot": (["bench", "--sizes", "4", "--repeat", "1"], "--plot", "bench", "load_backend"),
}


@pytest.mark.parametrize("kind", ["empty", "dot", "root", "trailing separator", "parent is a file",
                                  "taken by a folder", "folder cannot be created"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unusable_output_paths_stop_before_any_work(tmp_path, capsys, monkeypatch, command, kind):
    """An output that cannot be written is one line naming the option and the
    path, exit 2, before the run: not a traceback after it, with the results lost."""
    import importlib

    paths = _bad_paths(tmp_path)
    if kind not in paths:
        pytest.skip("no /proc here")
    path, message = paths[kind]
    arguments, option, module_name, first_work = COMMANDS[command]
    module = importlib.import_module(f"unitary_lr.cli.{module_name}")

    def work(*args, **kwargs):
        raise AssertionError("the run started before its outputs were checked")

    monkeypatch.setattr(module, first_work, work)
    assert main([*arguments, "--no-progress", option, path]) == 2
    err = capsys.readouterr().err
    name = command.split()[0]
    messages = (message,) if isinstance(message, str) else message
    assert err.startswith(f"unitary-lr {name}: error: {option}") and any(m in err for m in messages), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_outputs_go_to_new_folders_and_next_to_existing_ones(tmp_path):
    (tmp_path / "toy").mkdir()  # a folder of the prefix's name does not stop prefix.json
    for out in (tmp_path / "toy", tmp_path / "new" / "deeper" / "toy"):
        assert main([*SMALL, "--steps", "2", "--ranks", "1", "--out", str(out)]) == 0
        assert strict_json(out.with_name("toy.json"))["results"][0]["steps_done"] == 2
        assert out.with_name("toy.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "toy", "toy.json", "toy.png"]  # no temp files


def test_json_is_strict_and_replaced_atomically(tmp_path, monkeypatch):
    """JSON without NaN (null instead), and a write cut at any moment leaves the
    previous file whole: the new one is written aside and renamed over it."""
    from unitary_lr.cli import _output

    path = tmp_path / "record.json"
    _output.write_json(path, {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}, "e": (2,)})
    assert strict_json(path) == {"a": None, "b": [1.5, None], "c": {"d": None}, "e": [2]}

    def cut(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(_output.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        _output.write_json(path, {"a": 1.0})
    assert strict_json(path)["b"] == [1.5, None]
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # the temporary file is gone too


def test_interrupted_toy_writes_strict_json(tmp_path, monkeypatch):
    """Ctrl-C before a rank's first step: its time per step is null, not NaN."""
    real_step = toy_module.ProjUNN.step
    calls = {"n": 0}

    def step_then_interrupt(self, W, G):
        calls["n"] += 1
        if calls["n"] > 3:  # the first step of the second rank
            raise KeyboardInterrupt
        return real_step(self, W, G)

    monkeypatch.setattr(toy_module.ProjUNN, "step", step_then_interrupt)
    out = tmp_path / "cut"
    assert main([*SMALL, "--steps", "3", "--ranks", "1", "2", "--out", str(out)]) == 130
    record = strict_json(out.with_name("cut.json"))
    first, second = record["results"]
    assert first["steps_done"] == 3 and first["ms_per_step"] > 0
    assert second["steps_done"] == 0 and second["ms_per_step"] is None and len(second["loss"]) == 1
    assert out.with_name("cut.png").is_file()


def test_toy_interrupted_at_any_moment_leaves_whole_results(tmp_path):
    """Ctrl-C at any line of the run: exit 130, strict JSON whose curves match
    their step counts, and the plot when there is a curve."""
    from _interrupts import moments, run_with_interrupt

    from unitary_lr.cli._session import execute  # every subcommand's work runs in it

    out = tmp_path / "toy"
    argv = [*SMALL, "--n", "6", "--steps", "3", "--ranks", "1", "2", "--no-plot", "--out", str(out)]
    for at in moments(main, argv, execute, 25):
        out.with_name("toy.json").unlink(missing_ok=True)
        status, _ = run_with_interrupt(main, argv, execute, at)
        assert status == 130, at
        record = strict_json(out.with_name("toy.json"))
        assert record["interrupted"] is True
        for result in record["results"]:
            assert len(result["loss"]) == result["steps_done"] + 1, (at, result)
            assert math.isfinite(result["final_loss"]) and result["unitarity_error"] < 1e-12, (at, result)


@pytest.mark.parametrize("command", ["toy", "copy", "adding", "conv"])
def test_every_experiment_has_threads_one_by_default(command):
    """One thread unless asked: measured on a busy 2-core machine, torch's
    default (2 threads) made copy --quick take 2x as long."""
    from unitary_lr.cli import build_parser
    from unitary_lr.cli._output import resolve_threads

    args = build_parser().parse_args([command])
    resolve_threads(args)
    assert args.threads == 1 and not args.threads_given
    args = build_parser().parse_args([command, "--threads", "2"])
    resolve_threads(args)
    assert args.threads == 2 and args.threads_given


def test_toy_threads_apply_before_the_run_and_are_restored(tmp_path, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]
    seen = []
    real = toy_module.load_backend

    def first_work(*args, **kwargs):
        seen.append([pool["num_threads"] for pool in threadpoolctl.threadpool_info()])
        return real(*args, **kwargs)

    monkeypatch.setattr(toy_module, "load_backend", first_work)
    assert main([*SMALL, "--steps", "2", "--ranks", "1", "--no-plot", "--threads", "1",
                 "--out", str(tmp_path / "t")]) == 0
    assert seen and set(seen[0]) <= {1}
    assert strict_json(tmp_path / "t.json")["settings"]["threads"] == 1
    assert [pool["num_threads"] for pool in threadpoolctl.threadpool_info()] == before
    assert main([*SMALL, "--threads", "0", "--out", str(tmp_path / "t")]) == 2


def test_missing_modules_name_a_command_pip_can_run(tmp_path, capsys, monkeypatch):
    """The hints name packages an index serves, not the project's own extras."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*SMALL, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib not installed: pip install matplotlib" in err and "unitary-lr[" not in err
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["copy", "--steps", "1", "--no-plot", "--no-progress", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "PyTorch is not installed: pip install torch" in err and err.count("\n") == 1


def test_threads_without_threadpoolctl(tmp_path, capsys, monkeypatch):
    """Without threadpoolctl NumPy's BLAS cannot be limited: an explicit
    --threads says so; the default does not stop the run."""
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    assert main([*SMALL, "--steps", "1", "--ranks", "1", "--no-plot", "--out", str(tmp_path / "t")]) == 0
    assert main([*SMALL, "--steps", "1", "--ranks", "1", "--no-plot", "--threads", "1",
                 "--out", str(tmp_path / "t")]) == 2
    assert "--threads needs threadpoolctl for NumPy's BLAS: pip install threadpoolctl" in capsys.readouterr().err


# --- the parsers: shared flags, help, and the registries as choices ----------------------------

def _subparsers():
    from unitary_lr.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, action.choices


def test_every_help_works_and_lists_each_flag_once(capsys):
    """unitary-lr --help and every subcommand's --help: exit 0, every flag the
    parser knows is in the text, none twice (a parent and the subcommand
    defining the same flag would be an argparse error or a second entry)."""
    import re

    _, commands = _subparsers()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in commands)
    for name, subparser in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        text = capsys.readouterr().out
        assert text.startswith(f"usage: unitary-lr {name} "), name
        flags = [s for a in subparser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        assert len(flags) == len(set(flags)), name
        listed = re.findall(r"^  (--[A-Za-z0-9-]+)", text, flags=re.MULTILINE)
        assert sorted(listed) == sorted(flags), name
        assert "--no-progress" in flags  # every subcommand reports progress through the same helper
        if name != "bench":
            assert {"--out", "--no-plot", "--threads"} <= set(flags), name
            assert "how it runs and what it writes:" in text, name


def test_variant_and_base_rule_choices_are_the_registries():
    from unitary_lr.optim import RULES
    from unitary_lr.steps import VARIANTS

    _, commands = _subparsers()
    choices = {(name, s): tuple(a.choices) for name, p in commands.items() for a in p._actions
               for s in a.option_strings if s in ("--variant", "--variants", "--base", "--optimizer")}
    assert choices == {
        ("toy", "--variant"): tuple(VARIANTS), ("toy", "--base"): tuple(RULES),
        ("copy", "--variants"): tuple(VARIANTS), ("copy", "--optimizer"): tuple(RULES),
        ("adding", "--variants"): tuple(VARIANTS), ("adding", "--optimizer"): tuple(RULES),
        ("conv", "--variant"): tuple(VARIANTS),
    }


def test_a_registered_base_rule_is_a_choice_with_no_change_to_the_cli(tmp_path, capsys, monkeypatch):
    """A rule added to unitary_lr.optim.RULES (a real one: SGD with Nesterov
    momentum) is a choice of --base; toy has no measured learning rate for it,
    so it asks for --lr, and with one it learns."""
    from dataclasses import dataclass

    from unitary_lr import optim

    @dataclass(frozen=True)
    class NesterovSGD(optim.SGD):
        momentum: float = 0.5
        nesterov: bool = True

    monkeypatch.setitem(optim.RULES, "nesterov", NesterovSGD)
    out = tmp_path / "nesterov"
    common = [*SMALL, "--ranks", "4", "--dtype", "float64", "--base", "nesterov", "--no-plot", "--out", str(out)]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err == "unitary-lr toy: error: --base nesterov has no measured default learning rate here: give --lr\n"
    assert main([*common, "--lr", "2"]) == 0
    record = read(out)
    assert record["settings"]["base"] == "nesterov"
    loss = record["results"][0]["loss"]
    assert loss[-1] < 0.5 * loss[0] and record["results"][0]["unitarity_error"] < 1e-12
