"""``unitary-lr bench`` and the asv suite in asv_benchmarks/.

Nothing here asserts on speed: the machines are shared and noisy. The tests
check that the command measures what it says (every method and size, ratios
that follow from the times, accurate steps, slopes, a plot), that bad flags
are one-line errors, and that every asv benchmark still runs (asv itself is
not needed: the methods are called directly, as asv would).
"""

import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import math
import pkgutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from array_api_compat import array_namespace

from unitary_lr import projunn_step, unitarity_error
from unitary_lr.cli import _peers, main
from unitary_lr.cli import bench as bench_module
from unitary_lr.optim import RULES
from unitary_lr.steps import VARIANTS

SMALL = ["bench", "--sizes", "32", "64", "--ranks", "1", "--repeat", "2", "--no-progress"]
# one step per registered variant (test_bench_times_every_registered_variant checks the names)
STEPS_AND_DENSE = ("floor", *bench_module.STEPS, "dense SVD polar", "dense expm step", "dense Cayley step")
OPTIMIZERS = ("torch.optim.RMSprop", "ProjUNN(base='rmsprop')")  # every torch run
# every torch run on a CUDA device: both, capturable, one step captured in a CUDA graph
CAPTURED_OPTIMIZERS = ("torch.optim.RMSprop (CUDA graph)", "ProjUNN(base='rmsprop') (CUDA graph)")
JAX_OPTIMIZERS = ("floor (jit)", "optax.rmsprop (jit)", "unitary_lr.optax.projunn (jit)")  # every JAX run
UNITARY_OPTIMIZERS = {"ProjUNN(base='rmsprop')": "torch.optim.RMSprop",
                      "ProjUNN(base='rmsprop') (CUDA graph)": "torch.optim.RMSprop (CUDA graph)",
                      "unitary_lr.optax.projunn (jit)": "optax.rmsprop (jit)"}


def have(module):
    return importlib.util.find_spec(module) is not None


def run_json(tmp_path, *arguments):
    path = tmp_path / "bench.json"
    assert main([*SMALL, *arguments, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def check_record(record, *, sizes, methods, unitarity_tol):
    """Every method at every size, consistent ratios and slopes, accurate steps."""
    rows = record["results"]
    assert {(r["method"], r["n"]) for r in rows} == {(m, n) for m in methods for n in sizes}
    floor = {r["n"]: r["median_s"] for r in rows if r["method"] == "floor"}
    k_min = min((r["k"] for r in rows if r["method"] == "projUNN-T"), default=None)
    tangent = {r["n"]: r["median_s"] for r in rows if r["method"] == "projUNN-T" and r["k"] == k_min}
    plain = {(r["method"], r["n"]): r["median_s"] for r in rows if r["method"] in UNITARY_OPTIMIZERS.values()}
    jitted_floor = {r["n"]: r["median_s"] for r in rows if r["method"] == "floor (jit)"}
    dense = {n: min(r["median_s"] for r in rows if r["kind"] == "dense" and r["n"] == n)
             for n in sizes if any(r["kind"] == "dense" and r["n"] == n for r in rows)}
    for r in rows:
        assert len(r["times_s"]) == record["settings"]["repeat"] and min(r["times_s"]) > 0
        assert r["median_s"] == statistics.median(r["times_s"])
        assert r["ratio_to_floor"] == pytest.approx(r["median_s"] / floor[r["n"]], rel=1e-12)
        if r["n"] in dense:
            assert r["speedup_over_dense"] == pytest.approx(dense[r["n"]] / r["median_s"], rel=1e-12)
        else:
            assert r["speedup_over_dense"] is None
        if r["kind"] in ("step", "dense", "peer") or r["method"] in UNITARY_OPTIMIZERS:
            assert math.isfinite(r["median_s"]) and r["unitarity_error"] < unitarity_tol, r
        else:
            assert r["unitarity_error"] is None
        if r["kind"] == "peer":
            assert r["ratio_to_projunn_t"] == pytest.approx(r["median_s"] / tangent[r["n"]], rel=1e-12)
        else:
            assert r["ratio_to_projunn_t"] is None
        if r["method"] in UNITARY_OPTIMIZERS:
            counterpart = plain[(UNITARY_OPTIMIZERS[r["method"]], r["n"])]
            assert r["ratio_to_rmsprop"] == pytest.approx(r["median_s"] / counterpart, rel=1e-12)
        else:
            assert r["ratio_to_rmsprop"] is None
        if r["method"] == "unitary_lr.optax.projunn (jit)":
            assert r["ratio_to_jitted_floor"] == pytest.approx(r["median_s"] / jitted_floor[r["n"]], rel=1e-12)
        else:
            assert r["ratio_to_jitted_floor"] is None
        if r["kind"] == "rsvd":
            # a rank-1 sketch with 10 extra columns and 2 power iterations is
            # close to optimal on the 1/j spectrum; 1 is the optimum itself
            assert 1 - 1e-6 < r["relative_error"] < 1.5, r
        else:
            assert r["relative_error"] is None
        assert (r["k"] is None) == (r["kind"] not in ("step", "rsvd") and r["method"] not in UNITARY_OPTIMIZERS)
    slopes = {(s["method"], s["k"]): s for s in record["slopes"]}
    assert set(slopes) == {(r["method"], r["k"]) for r in rows}
    for s in slopes.values():
        times = [r["median_s"] for n in s["sizes"] for r in rows
                 if (r["method"], r["k"], r["n"]) == (s["method"], s["k"], n)]
        expected = math.log(times[-1] / times[0]) / math.log(s["sizes"][-1] / s["sizes"][0])
        assert s["slope"] == pytest.approx(expected, rel=1e-9, abs=1e-12)  # two sizes: the line through both


def test_bench_table_json_and_plot(tmp_path, capsys):
    json_path, png_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    assert main([*SMALL, "--json", str(json_path), "--plot", str(png_path)]) == 0
    printed = capsys.readouterr().out
    for heading in ("method", "time [ms]", "x floor", "speed-up vs dense", "unitarity error", "error / optimal",
                    "slope of log time vs log n"):
        assert heading in printed
    methods = [*STEPS_AND_DENSE, "unitary_lr randomized_svd"] + ["sklearn randomized_svd"] * have("sklearn")
    for method in methods:
        assert printed.count(f"{method}  32  ") == 1 and printed.count(f"{method}  64  ") == 1
    assert "note: torch.svd_lowrank skipped: it takes torch tensors (--backend torch)" in printed
    assert f"wrote {json_path}, {png_path}" in printed

    record = json.loads(json_path.read_text())
    assert record["command"] == "unitary-lr " + " ".join([*SMALL, "--json", str(json_path), "--plot", str(png_path)])
    assert record["experiment"] == "bench" and record["interrupted"] is False
    assert record["settings"]["sizes"] == [32, 64] and record["settings"]["dtype"] == "float64"
    assert record["environment"]["numpy"] == np.__version__ and "platform" in record["environment"]
    check_record(record, sizes=[32, 64], methods=methods, unitarity_tol=1e-12)

    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_on_every_backend(backend, tmp_path):
    options = backend.cli
    dtype = "complex128" if backend.has_float64 else "complex64"
    record = run_json(tmp_path, *options, "--dtype", dtype, "--sizes", "16", "32", "--repeat", "1")
    strict = backend.name.startswith("array_api_strict")
    methods = [m for m in STEPS_AND_DENSE if not (strict and m == "dense expm step")]
    methods += ["unitary_lr randomized_svd"] + ["torch.svd_lowrank", *OPTIMIZERS] * backend.name.startswith("torch")
    methods += list(CAPTURED_OPTIMIZERS) * (backend.name == "torch:cuda")
    methods += list(JAX_OPTIMIZERS) * backend.name.startswith("jax")
    check_record(record, sizes=[16, 32], methods=methods, unitarity_tol=1e-12 if backend.has_float64 else 1e-5)
    if strict:
        assert "dense expm step skipped: array_api_strict has no matrix exponential" in record["notes"]


def test_bench_on_jax_prints_the_jitted_optax_update_against_rmsprop_and_the_jitted_floor(tmp_path, capsys):
    """The issue's JAX figure: ``jax.jit(projunn(...).update)`` over
    ``jax.jit(optax.rmsprop(...).update)`` and over the floor under jit, per n
    and k; the update lands on a unitary matrix."""
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    record = run_json(tmp_path, "--backend", "jax", "--dtype", "float32", "--sizes", "16", "32", "--ranks", "1", "2",
                      "--repeat", "1")
    printed = capsys.readouterr().out
    table = printed.split("projunn / floor (jit)")[1]
    for n in (16, 32):
        for k in (1, 2):
            r = next(r for r in record["results"] if r["method"] == "unitary_lr.optax.projunn (jit)"
                     and (r["n"], r["k"]) == (n, k))
            assert r["unitarity_error"] < 1e-5
            assert f"{n}  {k}  " in table
            assert f"{r['ratio_to_rmsprop']:.3g}" in table and f"{r['ratio_to_jitted_floor']:.3g}" in table
    assert {r["method"] for r in record["results"] if r["kind"] == "jitted floor"} == {"floor (jit)"}
    assert "note: the jitted optax updates carry their state from one update to the next" in printed
    assert "step their parameter in place" not in printed


def test_bench_sklearn_is_skipped_with_a_note_for_complex_input(tmp_path):
    record = run_json(tmp_path, "--dtype", "complex128", "--sizes", "16", "32", "--repeat", "1")
    assert "sklearn randomized_svd skipped: it rejects complex input" in record["notes"]
    assert not any(r["method"] == "sklearn randomized_svd" for r in record["results"])


def test_bench_times_every_registered_variant(tmp_path):
    """One projUNN step per entry of unitary_lr.steps.VARIANTS, named as in the paper
    where it has a name there, each timed at every size and rank and kept unitary."""
    assert bench_module.STEPS["projUNN-T"] == "tangent" and bench_module.STEPS["projUNN-D"] == "direct"
    assert sorted(bench_module.STEPS.values()) == sorted(VARIANTS)
    record = run_json(tmp_path, "--sizes", "16", "--ranks", "1", "2", "--repeat", "1")
    steps = [r for r in record["results"] if r["kind"] == "step"]
    assert sorted((r["method"], r["k"]) for r in steps) == sorted((m, k) for m in bench_module.STEPS for k in (1, 2))
    assert all(r["unitarity_error"] < 1e-12 for r in steps)


def dense_cayley_reference(W, G, lr):
    """(I + lr/2 A)^-1 (I - lr/2 A) W, A = G W^H - W G^H, by SciPy in float64/complex128."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    A = G @ W.conj().T - W @ G.conj().T
    eye = np.eye(W.shape[0])
    return scipy_linalg.solve(eye + lr / 2 * A, (eye - lr / 2 * A) @ W)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("shape", [(12, 12), (12, 5)])
def test_bench_dense_cayley_step_is_the_cayley_map(complex_, shape):
    """The bench's dense baseline is the full-capacity uRNN step: SciPy's solve
    of the Cayley map, with orthonormal columns kept; for a rank-1 gradient the
    low-rank Cayley step (an exact sketch) is the same step."""
    rng = np.random.default_rng(3)
    n, m = shape
    W = np.linalg.qr(rng.standard_normal((n, m)) + 1j * complex_ * rng.standard_normal((n, m)))[0]
    G = np.outer(rng.standard_normal(n) + 1j * complex_ * rng.standard_normal(n), rng.standard_normal(m))
    step = bench_module._dense_cayley(array_namespace(W), "cpu", W, G)()
    reference = dense_cayley_reference(W, G, bench_module.LEARNING_RATE)
    assert np.linalg.norm(step - reference) < 1e-13 * np.linalg.norm(reference)
    assert float(unitarity_error(step)) < 1e-14 and np.linalg.norm(step - W) > 1e-3
    lowrank = projunn_step(W, G, lr=bench_module.LEARNING_RATE, rank=1, variant="cayley", rng=0)
    assert np.linalg.norm(lowrank - reference) < 1e-12 * np.linalg.norm(reference)


def test_bench_columns_time_every_variant_on_n_by_m_matrices(tmp_path, capsys):
    """--columns: at every n, each m < n gets the floor, every registered variant
    at every rank and the dense Cayley step on an n x m matrix with orthonormal
    columns, with ratios per shape and to the same variant's square step;
    m >= n is left out with a note."""
    record = run_json(tmp_path, "--sizes", "16", "32", "--columns", "8", "24", "40", "--ranks", "1", "2",
                      "--repeat", "2")
    printed = capsys.readouterr().out
    rows = record["results"]
    assert record["settings"]["columns"] == [8, 24, 40]
    rectangular = [r for r in rows if r["m"] != r["n"]]
    expected = {(m, n, k) for n, m in ((16, 8), (32, 8), (32, 24)) for m, k in
                [(m, None)] * 2 + [(m, k) for k in (1, 2)]}
    assert {(r["m"], r["n"], r["k"]) for r in rectangular} == expected
    assert sorted((r["method"], r["k"]) for r in rectangular if (r["n"], r["m"]) == (32, 24)) == sorted(
        [("floor", None), ("dense Cayley step", None)] + [(method, k) for method in bench_module.STEPS for k in (1, 2)])
    assert "projUNN-C" in bench_module.STEPS and bench_module.STEPS["projUNN-C"] == "cayley"
    assert all(r["m"] == r["n"] for r in rows if r["kind"] not in ("floor", "step", "dense"))
    square = {(r["method"], r["k"], r["n"]): r["median_s"] for r in rows if r["m"] == r["n"]}
    for r in rectangular:
        assert len(r["times_s"]) == 2 and r["median_s"] == statistics.median(r["times_s"])
        floor = next(f["median_s"] for f in rows if f["kind"] == "floor" and (f["n"], f["m"]) == (r["n"], r["m"]))
        assert r["ratio_to_floor"] == pytest.approx(r["median_s"] / floor, rel=1e-12)
        if r["kind"] == "step":
            assert r["unitarity_error"] < 1e-12
            assert r["ratio_to_square"] == pytest.approx(r["median_s"] / square[(r["method"], r["k"], r["n"])],
                                                         rel=1e-12)
            dense = next(d["median_s"] for d in rectangular
                         if d["kind"] == "dense" and (d["n"], d["m"]) == (r["n"], r["m"]))
            assert r["speedup_over_dense"] == pytest.approx(dense / r["median_s"], rel=1e-12)
        else:
            assert r["ratio_to_square"] is None
        if r["kind"] == "dense":
            assert r["unitarity_error"] < 1e-12
    assert all(r["ratio_to_square"] is None for r in rows if r["m"] == r["n"])
    slopes = {(s["method"], s["k"], s["m"]): s for s in record["slopes"]}
    assert slopes[("projUNN-C", 2, 8)]["sizes"] == [16, 32] and slopes[("projUNN-C", 2, 24)]["slope"] is None
    assert slopes[("projUNN-C", 2, None)]["sizes"] == [16, 32]
    assert "--columns m >= n is the square case or a wide matrix: not timed: m = 40" in record["notes"]
    assert "x square" in printed and "projUNN-C k=2 m=8" in printed


def test_bench_interrupted_at_any_moment_leaves_whole_results(tmp_path):
    """Ctrl-C at any line of the work: exit 130, and strict JSON holding the
    sizes that were complete, every row timed --repeat times."""
    from _interrupts import moments, run_with_interrupt

    from unitary_lr.cli._session import execute  # every subcommand's work runs in it

    path = tmp_path / "cut.json"
    argv = ["bench", "--sizes", "4", "8", "--repeat", "1", "--no-progress", "--json", str(path)]
    assert main(argv) == 0
    whole = {n: sorted((r["method"], r["k"]) for r in json.loads(path.read_text())["results"] if r["n"] == n)
             for n in (4, 8)}
    for at in moments(main, argv, execute, 15):
        path.unlink(missing_ok=True)
        status, _ = run_with_interrupt(main, argv, execute, at)
        assert status == 130, at
        record = json.loads(path.read_text(), parse_constant=lambda constant: pytest.fail(constant))
        assert record["interrupted"] is True
        sizes = sorted({r["n"] for r in record["results"]})
        assert sizes in ([], [4], [4, 8]), (at, sizes)  # the sizes in order, each kept whole or not at all
        for n in sizes:
            assert sorted((r["method"], r["k"]) for r in record["results"] if r["n"] == n) == whole[n], (at, n)
        assert all(len(r["times_s"]) == 1 and r["median_s"] == r["times_s"][0] for r in record["results"]), at


def test_bench_dense_steps_above_the_limit_are_skipped_with_a_note(tmp_path, capsys):
    record = run_json(tmp_path, "--sizes", "16", "32", "--dense-max", "16", "--repeat", "1")
    assert {r["n"] for r in record["results"] if r["kind"] == "dense"} == {16}
    assert "dense steps skipped for n > 16 (--dense-max): n = 32" in record["notes"]
    assert "note: dense steps skipped for n > 16 (--dense-max): n = 32" in capsys.readouterr().out
    assert next(r for r in record["results"] if r["method"] == "projUNN-T" and r["n"] == 32)["speedup_over_dense"] is None


def test_bench_a_failing_method_is_reported_and_the_others_are_timed(tmp_path, monkeypatch, capsys):
    """One method that raises, when its case is built (a CUDA-graph capture
    did, on an H200) or when it first runs, costs its own rows only: the
    others are timed, the failure is a note naming the method, the size and
    the error, and the exit status is 1."""
    pytest.importorskip("torch")
    real_step = bench_module.projunn_step

    def direct_fails_at_32(*args, **kwargs):
        if kwargs["variant"] == "direct" and args[0].shape[0] == 32:
            raise ValueError("the direct step broke\nsecond line")
        return real_step(*args, **kwargs)

    def broken_rmsprop(W, G, lr):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(bench_module, "projunn_step", direct_fails_at_32)
    monkeypatch.setattr(_peers, "rmsprop", broken_rmsprop)
    path = tmp_path / "failed.json"
    assert main([*SMALL, "--backend", "torch", "--dtype", "float32", "--sizes", "16", "32",
                 "--json", str(path)]) == 1
    record = json.loads(path.read_text())
    timed = {(r["method"], r["n"]) for r in record["results"]}
    assert ("projUNN-D", 16) in timed and ("projUNN-D", 32) not in timed
    assert ("projUNN-T", 32) in timed and ("ProjUNN(base='rmsprop')", 32) in timed
    assert not any(method == "torch.optim.RMSprop" for method, _ in timed)
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 2 for r in record["results"])
    assert "FAILED at n = 32: projUNN-D k=1: ValueError: the direct step broke" in record["notes"]
    assert "FAILED at n = 16: torch.optim.RMSprop: RuntimeError: capture failed" in record["notes"]
    out, err = capsys.readouterr()
    assert "note: FAILED at n = 32: projUNN-D k=1" in out and "3 method(s) failed" in err
    # the ratio to RMSprop has no counterpart: no row claims one
    assert all(r["ratio_to_rmsprop"] is None for r in record["results"])


def test_bench_interrupt_keeps_the_complete_sizes(tmp_path, monkeypatch):
    real_step, calls = bench_module.projunn_step, {"n": 0}

    def step_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if kwargs["rank"] == 1 and args[0].shape[0] == 32 and calls["n"] > 8:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(bench_module, "projunn_step", step_then_interrupt)
    path = tmp_path / "cut.json"
    assert main([*SMALL, "--sizes", "16", "32", "--json", str(path)]) == 130
    record = json.loads(path.read_text())
    assert record["interrupted"] is True
    assert {r["n"] for r in record["results"]} == {16}


@pytest.mark.parametrize(("primer_max_s", "calls"), [(bench_module.PRIMER_MAX_S, 1 + 2 * 3), (0.0, 1 + 3)])
def test_bench_primes_each_quick_method_with_a_run_of_its_own(tmp_path, monkeypatch, primer_max_s, calls):
    """A quick method runs untimed right before each of its timed runs (so that
    it is timed after itself, not after whatever preceded it in the round);
    a slow one (warm-up above PRIMER_MAX_S) is not primed. The steps are
    counted per variant: one warm-up, then one or two runs per round."""
    real_step, counts = bench_module.projunn_step, {}

    def counted_step(*args, **kwargs):
        counts[kwargs["variant"]] = counts.get(kwargs["variant"], 0) + 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(bench_module, "projunn_step", counted_step)
    monkeypatch.setattr(bench_module, "PRIMER_MAX_S", primer_max_s)
    record = run_json(tmp_path, "--sizes", "16", "--repeat", "3", "--dense-max", "0")
    assert counts == {variant: calls for variant in VARIANTS}
    assert record["settings"]["primed_below_s"] == primer_max_s
    assert all(len(r["times_s"]) == 3 for r in record["results"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sizes", "1", "8"], "--sizes must be >= 2, got 1"),
        (["--ranks", "0"], "--ranks must lie in [1, smallest size = 32], got 0"),
        (["--ranks", "33"], "--ranks must lie in [1, smallest size = 32], got 33"),
        (["--columns", "0"], "--columns must be >= 1, got 0"),
        (["--columns", "8", "--ranks", "9"], "--ranks must lie in [1, smallest size = 8], got 9"),
        (["--repeat", "0"], "--repeat must be >= 1, got 0"),
        (["--dense-max", "-1"], "--dense-max must be >= 0, got -1"),
        (["--oversample", "-2"], "--oversample must be >= 0, got -2"),
        (["--power-iters", "-1"], "--power-iters must be >= 0, got -1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--plot", "."], "--plot must be a file path, got the directory '.'"),
        (["--peers"], "--peers times torch optimizers: add --backend torch (got --backend numpy)"),
        (["--backend", "torch", "--device", "nowhere:3"], "device 'nowhere:3' is not available to torch here"),
        (["--backend", "array_api_strict", "--device", "no_float64"],
         "dtype float64 is not available on device"),
    ],
)
def test_bench_bad_flags_are_one_line_errors(tmp_path, capsys, arguments, message):
    path = tmp_path / "x.json"
    assert main([*SMALL, *arguments, "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unitary-lr bench: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not path.exists()


@pytest.mark.skipif(not have("threadpoolctl"), reason="threadpoolctl is not installed")
def test_bench_threads_are_limited_during_the_run_and_restored(tmp_path):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    record = run_json(tmp_path, "--backend", "torch", "--threads", "1", "--sizes", "16", "32", "--repeat", "1")
    assert record["settings"]["threads"] == 1
    assert record["environment"]["thread_pools"] and all(p["num_threads"] == 1
                                                         for p in record["environment"]["thread_pools"])
    assert torch.get_num_threads() == before


def test_bench_threads_without_threadpoolctl_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl raises ImportError
    assert main([*SMALL, "--threads", "1", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    # the message every subcommand gives (one helper applies --threads for all of them)
    assert err == "unitary-lr bench: error: --threads needs threadpoolctl for NumPy's BLAS: pip install threadpoolctl\n"
    assert not (tmp_path / "x.json").exists()


def test_bench_json_path_that_is_a_directory(tmp_path, capsys):
    assert main([*SMALL, "--json", str(tmp_path)]) == 2
    assert f"--json must be a file path, got the directory '{tmp_path}'" in capsys.readouterr().err


def test_bench_bad_choices_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--dtype", "float16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dtype: invalid choice: 'float16'" in err and "Traceback" not in err


# --- bench --peers and the torch optimizers ----------------------------------------------------

PEER_PACKAGES = ("geoopt", "geotorch", "torch")
# geoopt 0.5 compiles helpers with torch.jit.script on import, deprecated in recent torch
GEOOPT_IMPORT = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def peer_methods(package):
    return [peer.method for peer in _peers.PEERS if peer.package == package]


@pytest.fixture(scope="module", params=["float32", "float64"])
def peers_run(request, tmp_path_factory):
    """One ``bench --peers`` run per dtype on tiny matrices: (record, printed).
    Module scope, so no capsys: stdout is captured by hand."""
    pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("peers") / "peers.json"
    plot = path.with_suffix(".png")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*SMALL, "--backend", "torch", "--peers", "--dtype", request.param, "--sizes", "16", "32",
                     "--repeat", "1", "--json", str(path), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a line style for every kind of row
    return json.loads(path.read_text()), printed.getvalue()


@GEOOPT_IMPORT
@pytest.mark.parametrize("package", PEER_PACKAGES)
def test_bench_peers_times_each_installed_peer(peers_run, package):
    pytest.importorskip(package)
    record, printed = peers_run
    rows = record["results"]
    for method in peer_methods(package):
        timed = [r for r in rows if r["method"] == method]
        assert [r["n"] for r in timed] == [16, 32] and all(r["kind"] == "peer" for r in timed)
        for r in timed:  # the one dense check after the timed steps, float32 included
            assert 0 < r["median_s"] < math.inf and r["unitarity_error"] < 1e-5, r
            assert r["ratio_to_projunn_t"] > 0
        assert printed.count(f"{method}  16  ") == 1
    if package != "torch":
        assert record["environment"][package] == importlib.import_module(package).__version__


@GEOOPT_IMPORT
def test_bench_peers_record_table_and_rmsprop_ratio(peers_run):
    record, printed = peers_run
    installed = [p for p in PEER_PACKAGES if have(p)]
    methods = [*STEPS_AND_DENSE, "unitary_lr randomized_svd", "torch.svd_lowrank", *OPTIMIZERS,
               *(m for p in installed for m in peer_methods(p))]
    check_record(record, sizes=[16, 32], methods=methods, unitarity_tol=1e-5)
    assert record["settings"]["peers"] is True and record["settings"]["peer_ratio_rank"] == 1
    assert "x projUNN-T" in printed
    assert "note: x projUNN-T: the peer's step time over the projUNN-T step's (k = 1) at the same n" in printed
    ratio_table = printed.split("ProjUNN / RMSprop")[1]
    for n in (16, 32):
        r = next(r for r in record["results"] if r["method"] == "ProjUNN(base='rmsprop')" and r["n"] == n)
        assert f"{n}  1  " in ratio_table and f"{r['ratio_to_rmsprop']:.3g}" in ratio_table


def test_bench_missing_peers_are_reported_not_installed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    for package in ("geoopt", "geotorch"):
        monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    record = run_json(tmp_path, "--backend", "torch", "--peers", "--sizes", "16", "32", "--repeat", "1")
    printed = capsys.readouterr().out
    for package in ("geoopt", "geotorch"):
        note = f"{package} is not installed (pip install {package}): not timed: " + ", ".join(peer_methods(package))
        assert note in record["notes"] and f"note: {note}" in printed
        assert not any(r["method"] in peer_methods(package) for r in record["results"])
    methods = [*STEPS_AND_DENSE, "unitary_lr randomized_svd", "torch.svd_lowrank", *OPTIMIZERS,
               *peer_methods("torch")]
    check_record(record, sizes=[16, 32], methods=methods, unitarity_tol=1e-12)


@GEOOPT_IMPORT
def test_bench_peers_complex_skips_the_real_only_peers(tmp_path):
    pytest.importorskip("torch")
    record = run_json(tmp_path, "--backend", "torch", "--peers", "--dtype", "complex64", "--sizes", "16", "32",
                      "--repeat", "1", "--dense-max", "16")
    for package in ("geoopt", "geotorch"):
        for method in peer_methods(package):
            assert not any(r["method"] == method for r in record["results"])
            if have(package):
                assert f"{method} skipped: {package} takes real matrices only" in record["notes"]
    assert "dense steps and peers skipped for n > 16 (--dense-max): n = 32" in record["notes"]
    methods = [*STEPS_AND_DENSE, "unitary_lr randomized_svd", "torch.svd_lowrank", *OPTIMIZERS,
               *peer_methods("torch")]
    rows = record["results"]
    assert {(r["method"], r["n"]) for r in rows} == ({(m, n) for m in methods for n in (16, 32)}
                                                      - {(m, 32) for m in methods if bench_module.KINDS[m] in
                                                         ("dense", "peer")})
    assert all(r["unitarity_error"] < 1e-5 for r in rows if r["kind"] == "peer")


@GEOOPT_IMPORT
def test_bench_columns_peers_time_geoopt_euclidean_stiefel_on_n_by_m(tmp_path):
    """With --peers, geoopt's QR-retraction step is the peer at every n x m
    shape, whatever --dense-max says (it is O(n m^2)), next to projUNN-T on the
    same matrix; the peers that work on an n x n embedding are not."""
    pytest.importorskip("torch")
    pytest.importorskip("geoopt")
    record = run_json(tmp_path, "--backend", "torch", "--peers", "--sizes", "16", "32", "--columns", "8",
                      "--dense-max", "16", "--repeat", "1")
    rows = record["results"]
    peers = [r for r in rows if r["kind"] == "peer" and r["m"] != r["n"]]
    assert [(r["method"], r["n"], r["m"]) for r in peers] == [(_peers.GEOOPT_EUCLIDEAN_SGD, n, 8) for n in (16, 32)]
    for r in peers:
        tangent = next(t["median_s"] for t in rows if t["method"] == "projUNN-T" and (t["n"], t["m"]) == (r["n"], 8))
        assert r["ratio_to_projunn_t"] == pytest.approx(r["median_s"] / tangent, rel=1e-12)
        assert r["unitarity_error"] < 1e-12
    assert not any(r["kind"] == "dense" and r["n"] == 32 for r in rows)


@GEOOPT_IMPORT
def test_stiefel_peer_descends_and_keeps_orthonormal_columns():
    """geoopt's EuclideanStiefel step, built from the bench's n x m W and G,
    lowers Re<G, W> and keeps W^H W = I (float64)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("geoopt")
    rng = np.random.default_rng(2)
    W = torch.linalg.qr(torch.as_tensor(rng.standard_normal((10, 4))))[0]
    G = torch.as_tensor(rng.standard_normal((10, 4)))
    (peer,) = [p for p in _peers.PEERS if p.method in _peers.STIEFEL_PEERS]
    stepper = peer.build(W, G, 1e-3)
    stepper.step()
    after = stepper.point()
    assert after.shape == (10, 4) and torch.sum(G * after) < torch.sum(G * W)
    assert float(torch.linalg.matrix_norm(after.mT @ after - torch.eye(4, dtype=after.dtype))) < 1e-12


@GEOOPT_IMPORT
@pytest.mark.parametrize("method", [peer.method for peer in _peers.PEERS] + list(OPTIMIZERS))
def test_peer_steps_descend_the_linear_loss(method):
    """Every peer and optimizer gets the bench's W and G as its own users would
    give them: one small step lowers the loss Re<G, W> whose gradient is G, and
    stays on the group. geoopt's EuclideanStiefel step agrees with projUNN-T to
    first order (the same W, G and learning rate mean the same step)."""
    torch = pytest.importorskip("torch")
    peer = next((p for p in _peers.PEERS if p.method == method), None)
    if peer is not None:
        pytest.importorskip(peer.package)
    rng = np.random.default_rng(0)
    n, lr = 8, 1e-4
    W = torch.linalg.qr(torch.as_tensor(rng.standard_normal((n, n))))[0]
    G = torch.as_tensor(np.outer(rng.standard_normal(n), rng.standard_normal(n)))  # rank 1: the T step is exact
    G_before = G.clone()
    if peer is not None:
        stepper = peer.build(W, G, lr)
    elif method == "torch.optim.RMSprop":
        stepper = _peers.rmsprop(W, G, lr)
    else:
        stepper = _peers.projunn_rmsprop(W, G, lr, rank=1, seed=0)
    assert torch.equal(stepper.point(), W)
    stepper.step()
    after = stepper.point()
    assert torch.equal(G, G_before)  # the shared gradient is left alone
    assert torch.sum(G * after) < torch.sum(G * W)
    if method != "torch.optim.RMSprop":
        assert float(unitarity_error(after)) < 1e-12
    if method == _peers.GEOOPT_EUCLIDEAN_SGD:
        tangent = projunn_step(W, G, lr=lr, rank=1, variant="tangent", rng=0)
        assert float(torch.linalg.matrix_norm(after - tangent)) < 1e-3 * float(torch.linalg.matrix_norm(tangent - W))


# --- the asv suite -----------------------------------------------------------------------------

SUITE = Path(__file__).resolve().parents[1] / "asv_benchmarks" / "benchmarks"
PREFIXES = ("time_", "peakmem_", "track_")


@pytest.fixture(scope="module")
def suite():
    """The benchmark modules, imported as asv imports them: as a package (under
    a name of our own, so that no other ``benchmarks`` package is shadowed)."""
    name = "unitary_lr_asv_suite"
    spec = importlib.util.spec_from_file_location(name, SUITE / "__init__.py", submodule_search_locations=[str(SUITE)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    try:
        yield [importlib.import_module(f"{name}.{info.name}") for info in pkgutil.iter_modules([str(SUITE)])]
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def benchmark_classes(modules):
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and any(n.startswith(PREFIXES) for n in dir(cls)):
                yield cls


def smallest_cases(cls):
    """Parameter tuples: numpy, the smallest n and k, every dtype and variant."""
    choices = []
    for name, values in zip(cls.param_names, cls.params):
        if name == "backend":
            choices.append(["numpy"])
        elif name == "base":
            choices.append(values[:1])
        elif name in ("n", "k", "T"):
            choices.append([min(values)])
        elif name in ("oversample", "power_iters", "gradient"):  # the sketch study: one case
            choices.append(values[:1])
        elif name == "method" and cls.__name__ == "PeerSteps":  # the peers that are installed
            packages = {peer.method: peer.package for peer in _peers.PEERS}
            choices.append([m for m in values if have(packages.get(m, "unitary_lr"))])
        else:
            choices.append(list(values))
    return list(itertools.product(*choices))


def test_asv_suite_covers_every_kernel_and_both_steps(suite):
    classes = {cls.__name__: cls for cls in benchmark_classes(suite)}
    assert {"RandomizedSVD", "ProjectUnitary", "ProjectUnitaryLowrank", "ExpTransport", "UnitarityError",
            "ProjunnStep", "StepExtraMemory", "StepAccuracy", "RectangularStep", "DenseCayleyStep"} <= set(classes)
    assert {"RNNForwardBackward", "SketchChoice", "StepLayout", "PeerSteps", "HouseholderApply",
            "AdapterForwardBackward"} <= set(classes)
    for cls in classes.values():
        assert len(cls.params) == len(cls.param_names)
        grid = dict(zip(cls.param_names, cls.params))
        own_grid = ("StepLayout", "HouseholderApply", "OptimStepMany", "ThinProducts", "LowRankUpdate")
        if "n" not in grid or "backend" not in grid or cls.__name__ in own_grid:
            continue
        assert grid["n"] == [256, 1024, 4096] and grid["backend"] == ["numpy", "torch", "jax", "cupy"]
        assert grid["dtype"] == ["float32", "float64", "complex64", "complex128"]
        if "k" in grid:
            assert grid["k"] == [1, 8]
    # the registries' names: a variant or base rule registered in the library is benchmarked too
    assert classes["ProjunnStep"].params[classes["ProjunnStep"].param_names.index("variant")] == list(VARIANTS)
    assert {"tangent", "direct", "cayley"} <= set(VARIANTS)
    rectangular = dict(zip(classes["RectangularStep"].param_names, classes["RectangularStep"].params))
    assert rectangular["variant"] == list(VARIANTS) and rectangular["m"] == ["n/16", "n/4"]  # 4096 x 256, x 1024
    torch_step = dict(zip(classes["TorchOptimizerStep"].param_names, classes["TorchOptimizerStep"].params))
    assert torch_step["variant"] == list(VARIANTS) and torch_step["base"] == list(RULES)
    assert hasattr(classes["ProjunnStep"], "peakmem_step")
    assert hasattr(classes["ProjectUnitary"], "time_svd") and hasattr(classes["ProjectUnitary"], "time_newton_schulz")
    layout = dict(zip(classes["StepLayout"].param_names, classes["StepLayout"].params))
    assert layout == {"n": [2048], "dtype": ["float64"], "variant": list(VARIANTS),
                      "backend": ["numpy", "torch"], "layout": ["row-major", "column-major"]}
    update = dict(zip(classes["LowRankUpdate"].param_names, classes["LowRankUpdate"].params))
    # a width whose rows lie a power of two apart, and one whose rows do not (see _xp._CHUNKED_RANKS)
    assert update == {"n": [1000, 1024], "dtype": ["float32", "float64", "complex128"], "backend": ["numpy", "torch"]}
    thin = dict(zip(classes["ThinProducts"].param_names, classes["ThinProducts"].params))
    # each side of the splits of NumPy and XLA (_xp.by_columns), and of PyTorch's
    # CPU plain form for wide real panels (_xp._TORCH_CPU_DIRECT_ROW_BYTES: 8 float32 columns)
    assert thin["r"] == [1, 2, 3, 4, 8, 16] and thin["backend"] == ["numpy", "torch", "jax"]
    assert thin["dtype"] == ["float32", "float64", "complex64"]
    assert hasattr(classes["ThinProducts"], "time_kernel") and hasattr(classes["ThinProducts"], "time_one_product")
    peers = dict(zip(classes["PeerSteps"].param_names, classes["PeerSteps"].params))
    assert peers["method"] == ["projUNN-T k=1"] + [peer.method for peer in _peers.PEERS]


@GEOOPT_IMPORT
def test_asv_benchmarks_run_once_on_numpy(suite):
    """setup and every time_/peakmem_/track_ method, once, at the smallest size."""
    ran = 0
    for cls in benchmark_classes(suite):
        for params in smallest_cases(cls):
            instance = cls()
            instance.setup(*params)
            for name in sorted(dir(cls)):
                if not name.startswith(PREFIXES):
                    continue
                value = getattr(instance, name)(*params)
                ran += 1
                if name.startswith("track_"):
                    assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (cls, name, value)
                    case = dict(zip(cls.param_names, params))
                    if name == "track_captured_energy":
                        assert 0.3 < value <= 1 + 1e-9
                    if name == "track_relative_error":
                        assert 1 - 1e-4 < value < 1.5
                    if name == "track_unitarity_after_100_steps":
                        assert value < (1e-4 if case["dtype"] in ("float32", "complex64") else 1e-12)
                    if name == "track_extra_memory":
                        # O(n k): no n x n temporary beyond the output
                        itemsize = np.dtype(case["dtype"]).itemsize
                        assert 0 < value < case["n"] ** 2 * itemsize / 4
    assert ran > 50


def test_asv_benchmarks_skip_by_raising_not_implemented(suite):
    """Missing backends and dense kernels at n = 4096 on a CPU are skipped (asv's
    NotImplementedError from setup), quickly and before any data is built."""
    for cls in benchmark_classes(suite):
        grid = dict(zip(cls.param_names, cls.params))
        case = {name: values[0] for name, values in grid.items()}
        if "backend" not in grid:
            continue
        if not have("cupy"):
            with pytest.raises(NotImplementedError, match="cupy|NumPy"):
                cls().setup(*{**case, "backend": "cupy"}.values())
        if cls.__name__ in ("ProjectUnitary", "UnitarityError", "StepAccuracy", "DenseCayleyStep"):
            with pytest.raises(NotImplementedError, match="n = 4096 > 1024"):
                cls().setup(*{**case, "n": 4096}.values())
        if cls.__name__ == "StepExtraMemory":
            with pytest.raises(NotImplementedError, match="NumPy"):
                cls().setup(*{**case, "backend": "torch"}.values())


def test_asv_peers_are_skipped_when_not_installed(suite, monkeypatch):
    peers = next(cls for cls in benchmark_classes(suite) if cls.__name__ == "PeerSteps")
    for package in ("geoopt", "geotorch"):
        monkeypatch.setitem(sys.modules, package, None)
        for peer in _peers.PEERS:
            if peer.package == package:
                with pytest.raises(NotImplementedError, match=rf"{package} is not installed \(pip install"):
                    peers().setup(256, "float64", peer.method)


def test_asv_rectangular_and_dense_cayley_cases(suite):
    """RectangularStep holds an n x m W with orthonormal columns and an n x m G;
    DenseCayleyStep's step is SciPy's Cayley map and keeps W orthogonal."""
    steps = next(module for module in suite if module.__name__.endswith(".steps"))
    case = steps.RectangularStep()
    case.setup(256, "n/4", 1, "complex128", "cayley", "numpy")
    W = np.asarray(case.W)
    assert W.shape == (256, 64) and np.asarray(case.G).shape == (256, 64)
    assert np.linalg.norm(W.conj().T @ W - np.eye(64)) < 1e-13
    dense = steps.DenseCayleyStep()
    dense.setup(256, "float64", "numpy")
    W, G = np.asarray(dense.W), np.asarray(dense.G)
    step = np.asarray(dense.cayley())
    assert float(unitarity_error(step)) < 1e-14
    reference = dense_cayley_reference(W, G, steps.LEARNING_RATE)
    assert np.linalg.norm(step - reference) < 1e-12 * np.linalg.norm(reference)
    dense.time_step(256, "float64", "numpy")


def test_asv_layout_case_holds_the_same_w_column_major(suite):
    pytest.importorskip("torch")
    layout = next(module for module in suite if module.__name__.endswith(".layout"))
    for backend in ("numpy", "torch"):
        case = layout.StepLayout()
        case.setup(2048, "float64", "tangent", backend, "column-major")
        W = np.asarray(case.W) if backend == "numpy" else case.W.cpu().numpy()
        assert W.flags.f_contiguous and not W.flags.c_contiguous
        row = layout.StepLayout()
        row.setup(2048, "float64", "tangent", backend, "row-major")
        assert (np.asarray(row.W) if backend == "numpy" else row.W.cpu().numpy()).flags.c_contiguous
        assert np.array_equal(W, np.asarray(row.W) if backend == "numpy" else row.W.cpu().numpy())


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_gpu_script_dry_run_on_the_cpu(tmp_path):
    """``docs/scripts/gpu_targets.sh`` is what a session with a lent GPU runs in
    one call; its dry run on the CPU (tiny sizes) checks that its commands
    still match the CLI: every bench part exits 0 and leaves its table and a
    JSON record in the archive."""
    import os
    import subprocess
    import tarfile

    pytest.importorskip("torch")
    pytest.importorskip("jax")
    script = Path(__file__).resolve().parents[1] / "docs" / "scripts" / "gpu_targets.sh"
    env = {**os.environ, "DEVICE": "cpu", "SIZES": "16", "COMPLEX_SIZES": "16", "PEER_SIZES": "16",
           "PART_TIMEOUT": "300", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script), "bench"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for file, part in [("bench-torch-float32", "bench-torch-float32"), ("bench-torch-float32", "precision-probe"),
                       ("bench-torch-float32", "update-forms"),
                       ("bench-torch-complex64", "bench-torch-complex64"), ("bench-jax-cupy", "bench-jax"),
                       ("bench-peers", "bench-peers"), ("bench-peers", "stacked")]:
        log = (tmp_path / f"{file}.txt").read_text()
        assert f"== {part}: exit 0 after" in log, log[-2000:]
        assert "projUNN-T" in log or part in ("precision-probe", "stacked", "update-forms")
    assert "torch " in (tmp_path / "versions.txt").read_text()
    with tarfile.open(tmp_path / "bench-json.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"torch-float32.json", "torch-complex64.json", "jax-float32.json", "peers.json"} <= names


# --- the accuracy column, the plot and the scripts in docs/scripts ------------------------------

SCRIPTS = Path(__file__).resolve().parents[1] / "docs" / "scripts"


def exact_factors(n, k, complex_, rng):
    """A = H1 diag(1/j) H2 (Householder reflections, built in O(n^2)) and its
    exact rank-k truncated SVD (U, S, Vh), all float64/complex128 NumPy."""
    from unitary_lr import _benchdata as data

    u, v = (data.gaussian(rng, (n,), complex_) for _ in range(2))
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    s = data.spectrum(n)
    left = np.diag(s) - 2.0 * np.outer(u, np.conj(u) * s)  # H1 D
    A = left - 2.0 * np.outer(left @ v, np.conj(v))  # H1 D H2
    eye = np.eye(n)[:k]
    U = (eye - 2.0 * np.outer(np.conj(u[:k]), u)).T  # the first k columns of H1
    Vh = eye - 2.0 * np.outer(v[:k], np.conj(v))  # the first k rows of H2
    return A, U, s[:k], Vh


@pytest.mark.parametrize("dtype", ["float32", "complex64", "float64"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_bench_rsvd_error_of_exact_factors_is_one_to_rounding(library, dtype):
    """The error / optimal column of the exact rank-k factors of a matrix with
    singular values 1/j, rounded to the working precision: what a float64
    NumPy evaluation of the same factors gives, and never below the optimum
    (torch's float32 norm of the 2048 x 2048 residual read 0.9999)."""
    from unitary_lr import _benchdata as data

    n, k = 2048, 2
    A, U, S, Vh = exact_factors(n, k, dtype.startswith("complex"), np.random.default_rng([5, n]))
    A, U, Vh = (x.astype(dtype) for x in (A, U, Vh))
    S = S.astype("float32" if dtype in ("float32", "complex64") else "float64")
    wide = np.complex128 if dtype.startswith("complex") else np.float64
    reference = np.linalg.norm(A.astype(wide) - (U.astype(wide) * S.astype(np.float64)) @ Vh.astype(wide))
    optimal = data.optimal_error(n, k)
    assert reference / optimal == pytest.approx(1.0, abs=1e-6)  # the factors are exact to rounding
    if library == "torch":
        torch = pytest.importorskip("torch")
        A, U, S, Vh = (torch.from_numpy(x) for x in (A, U, S, Vh))
    measured = bench_module._rsvd_error(U, S, Vh, A, optimal)
    assert measured >= 1 - 1e-6
    assert measured == pytest.approx(reference / optimal, rel=1e-12)


def test_asv_rsvd_relative_error_is_measured_in_float64(suite):
    """asv's track_relative_error on torch float32 at n = 2048: the float64
    NumPy figure of the same factors, at or above the optimum to rounding."""
    torch = pytest.importorskip("torch")
    from unitary_lr import randomized_svd

    kernels = next(module for module in suite if module.__name__.endswith(".kernels"))
    case = kernels.RandomizedSVD()
    n, k = 2048, 1
    case.setup(n, k, "float32", "torch")
    if case.backend.device.type != "cpu":
        pytest.skip("the imprecise float32 norm is torch's on a CPU")
    value = case.track_relative_error(n, k, "float32", "torch")
    U, S, Vh = (x.double().numpy() for x in randomized_svd(case.A, k, oversample=kernels.OVERSAMPLE,
                                                            power_iters=kernels.POWER_ITERS, rng=2))
    reference = np.linalg.norm(case.A.double().numpy() - (U * S) @ Vh) / kernels.optimal_error(n, k)
    assert value >= 1 - 1e-6 and value == pytest.approx(reference, rel=1e-9)
    assert torch.is_tensor(case.A) and case.A.dtype == torch.float32


def test_bench_plot_path_is_a_png_checked_before_the_run(tmp_path, capsys, monkeypatch):
    """--plot writes a PNG: a path with another extension is a one-line error
    before any work (it was a matplotlib traceback after the run, or an SVG);
    a path without one gets .png, and the last line names the file written."""
    def work(*args, **kwargs):
        raise AssertionError("the run started before --plot was checked")

    with monkeypatch.context() as patched:
        patched.setattr(bench_module, "load_backend", work)
        for name in ("out.xyz", "out.svg", "out.png.pdf"):
            path = tmp_path / "new" / name
            assert main([*SMALL, "--plot", str(path)]) == 2
            err = capsys.readouterr().err
            assert err == ("unitary-lr bench: error: --plot writes a PNG image: PATH must end in .png (or have no "
                           f"extension), got {str(path)!r}\n")
        assert not (tmp_path / "new").exists()  # nothing made on the way to the error
    for name, written in (("out", "out.png"), ("upper.PNG", "upper.PNG")):
        assert main(["bench", "--sizes", "8", "--repeat", "1", "--no-progress", "--dense-max", "0",
                     "--plot", str(tmp_path / name)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / written}"
        assert (tmp_path / written).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "upper.PNG"]  # no temporary files left


def many_series_rows():
    """Rows of every kind of method, square and at two column counts: more
    series (32) than any palette has colours, four of them floors."""
    rng = np.random.default_rng(0)
    rows = []
    for method, kind in bench_module.KINDS.items():
        for m in (None, 16, 48) if kind in ("floor", "step") else (None,):
            k = 1 if kind in bench_module.RANKED else None
            for n in (32, 64):
                rows.append({"method": method, "kind": kind, "n": n, "m": n if m is None else m, "k": k,
                             "median_s": float(rng.uniform(1e-5, 1e-1))})
    return rows


def test_bench_plot_legend_fits_and_tells_every_series_apart(tmp_path, monkeypatch):
    """With 32 series the whole legend lies inside the figure and off the axes
    (5 of 30 entries fell below the figure), and no two series are drawn
    alike (every floor was solid, thick and black)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def recording(figure, *args, **kwargs):
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    rows = many_series_rows()
    slopes = bench_module._slopes(rows)
    bench_module._plot(tmp_path / "many.png", rows, slopes, title="many")
    assert (tmp_path / "many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = saved
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    (axes,) = figure.axes
    legends = [*figure.legends, *[a.get_legend() for a in figure.axes if a.get_legend() is not None]]
    (legend,) = legends
    lines = axes.get_lines()
    assert len(lines) == len(slopes) == 32 and len(legend.get_texts()) == 32
    assert sum(bench_module.KINDS[s["method"]] in ("floor", "jitted floor") for s in slopes) == 4
    width, height = figure.bbox.width, figure.bbox.height
    for text in legend.get_texts():
        box = text.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height, text.get_text()
    assert not legend.get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))
    looks = [(to_rgba(line.get_color()), str(line.get_linestyle()), line.get_marker(), line.get_linewidth())
             for line in lines]
    assert len(set(looks)) == len(looks)


def test_bench_help_names_every_timed_variant(capsys):
    """``bench --help`` (the module docstring's first paragraph) names the
    step of every registered variant the bench times, projUNN-C included."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    described = " ".join(printed.split("options:")[0].split())
    assert "(PATH ends in .png; a name without extension gets it)" in " ".join(printed.split())
    assert set(bench_module.STEPS) == {"projUNN-T", "projUNN-D", "projUNN-C"}
    for label in bench_module.STEPS:
        assert label in described, label


def test_projunn_rmsprop_runs_at_the_rank_given_and_says_so():
    """The ProjUNN(base='rmsprop') rows run at the bench's --ranks, not at
    ProjUNN's default rank 8: a rank-1 step moves W by a matrix of rank <= 2,
    and the docstrings say which rank they run at."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    n = 16
    W = torch.linalg.qr(torch.as_tensor(rng.standard_normal((n, n))))[0]
    G = torch.as_tensor(rng.standard_normal((n, n)))  # full rank: a rank-8 step would move W in rank 16
    stepper = _peers.projunn_rmsprop(W, G, 0.1, rank=1, seed=0)
    stepper.step()
    moved = torch.linalg.svdvals(stepper.point() - W)
    assert int(torch.sum(moved > 1e-10 * moved[0])) <= 2 and float(moved[0]) > 1e-6
    for function in (_peers.projunn_rmsprop, _peers.projunn_rmsprop_graph, _peers.optax_projunn):
        doc = " ".join(inspect.getdoc(function).split())
        assert "rank=rank" in doc and "--ranks" in doc and "defaults otherwise" in doc, function.__name__
    assert "(8)" in " ".join(inspect.getdoc(_peers.projunn_rmsprop).split())


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"unitary_lr_docs_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not have("threadpoolctl"), reason="threadpoolctl is not installed")
def test_ab_step_runs_numpy_on_one_blas_thread(tmp_path, monkeypatch):
    """docs/scripts/ab_step.py says "One thread": NumPy's BLAS pool has one
    thread while the trees' steps run (only torch's pool was limited)."""
    import runpy

    from threadpoolctl import threadpool_limits

    old = tmp_path / "unitary_lr_old"
    old.mkdir()
    # a stand-in for the old tree: it records the BLAS pools at each of its steps
    (old / "__init__.py").write_text(
        "from threadpoolctl import threadpool_info\n"
        "seen = []\n"
        "def projunn_step(W, G, **options):\n"
        "    seen.append([p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'])\n"
        "    return W\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", ["ab_step.py", str(tmp_path), "numpy", "float64", "16", "--ranks", "1",
                                      "--rounds", "2"])
    monkeypatch.delitem(sys.modules, "unitary_lr_old", raising=False)
    try:
        with threadpool_limits(limits=2), contextlib.redirect_stdout(io.StringIO()) as printed:
            runpy.run_path(str(SCRIPTS / "ab_step.py"), run_name="__main__")  # the limits are restored after
        seen = sys.modules["unitary_lr_old"].seen
    finally:
        sys.modules.pop("unitary_lr_old", None)
    assert "numpy float64 n = 16, rank 1: old" in printed.getvalue()
    assert len(seen) == 10 + 2 and all(pools and set(pools) == {1} for pools in seen), seen


def test_update_forms_prints_what_its_header_says(monkeypatch, capsys):
    """docs/scripts/update_forms.py prints per form the smallest of its three
    batches' 20th percentiles, and its header and docstring say so."""
    torch = pytest.importorskip("torch")
    script = load_script("update_forms")
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the test process keeps its pool
    batches = iter(itertools.cycle([30.0, 10.0, 40.0, 20.0, 50.0, 60.0]))  # addmm, blocks, addmm, ...
    monkeypatch.setattr(script, "_timed", lambda device, run, rounds: next(batches))
    monkeypatch.setattr(sys, "argv", ["update_forms.py", "--max-entries", str(512 * 512), "--rounds", "3"])
    script.main()
    header, columns, first, *_ = capsys.readouterr().out.splitlines()
    assert header.endswith("times in us (the smallest of 3 batches' 20th percentiles)")
    assert first.split()[4:7] == ["30.0", "10.0", "3.00"]  # min(30, 40, 50), min(10, 20, 60)
    assert "the smallest of its three batches' 20th percentiles" in " ".join(script.__doc__.split())


def test_orthogonal_regression_refuses_complex_geotorch_in_one_line(capsys):
    """geotorch takes real matrices only: --complex --geotorch is a one-line
    error before any training (it was a traceback from inside geotorch)."""
    pytest.importorskip("torch")
    script = load_script("orthogonal_regression")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--n", "8", "--steps", "2", "--complex", "--geotorch", "--no-peers"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith(": error: --geotorch takes real matrices only: drop --complex or --geotorch\n")
    assert captured.err.count("\n") == 1
