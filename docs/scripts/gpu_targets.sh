#!/usr/bin/env bash
# The GPU measurements and tests of the launch-lean targets (docs/benchmarks.md,
# "Launch-lean steps") in one call on a machine with an NVIDIA GPU.
#
#   bash docs/scripts/gpu_targets.sh [bench|tests|copy|all]    (default: all)
#
# Writes at most eight files to $OUT (or ./gpu-results): versions.txt, one log
# per part and bench-json.tar.gz with the bench's JSON records. Each part has
# its own time limit (PART_TIMEOUT seconds, default 300, or the part's own
# LIMIT_<NAME> with dashes as underscores, e.g. LIMIT_bench_peers=60) and a
# failing part does not stop the others. BUDGET (seconds, default none) caps
# the whole run: every part's limit is cut to what is left of it, and a part
# with less than 10 s left is skipped, so a lease of a few minutes returns
# every log. "all" runs the parts in the order of their value when time is
# short: the capture tests, the float32 table, the precision probe and the step profile, the
# complex64 and JAX tables, the GPU test matrix, the peers, CuPy, the copy
# task, the stacked optimizer.
#
# A machine that cannot reach the package index needs array-api-compat and
# array-api-strict (and, for the peers, geoopt and geotorch) as wheels in a
# git-ignored .whl/ folder of the checkout, made where pip works, for the
# machine's Python (3.12 on the lent H200s):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       array-api-compat==1.16.0 array-api-strict==2.6.1 geoopt==0.5.1 geotorch==0.4.0
#
# and the call carries .whl. A dry run on a CPU, to check the plumbing:
#
#   DEVICE=cpu SIZES="64 128" COMPLEX_SIZES=64 PEER_SIZES=128 COPY_STEPS=3 COPY_LONG_STEPS=2 PART_TIMEOUT=120 \
#       bash docs/scripts/gpu_targets.sh
#
# (JAX_SIZES and the precision probe's PROBE_N follow PEER_SIZES unless given.)
set -uo pipefail
cd "$(dirname "$0")/../.."

what=${1:-all}
out=${OUT:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
jax_device=$([ "$device" = cpu ] && echo cpu || echo gpu)
sizes=${SIZES:-"512 1024 4096 8192 16384"}
complex_sizes=${COMPLEX_SIZES:-"1024 4096 16384"}
peer_sizes=${PEER_SIZES:-"1024 4096"}
jax_sizes=${JAX_SIZES:-$peer_sizes}
dense_max=${DENSE_MAX:-4096}
probe_n=${PROBE_N:-${peer_sizes%% *}}
copy_steps=${COPY_STEPS:-60}
copy_long_steps=${COPY_LONG_STEPS:-10}
limit=${PART_TIMEOUT:-300}
deadline=$((SECONDS + ${BUDGET:-1000000}))
json=$(mktemp -d)
export PYTHONUNBUFFERED=1
# several processes (the test matrix's workers, torch beside JAX) share the GPU
export XLA_PYTHON_CLIENT_PREALLOCATE=false

site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    site=/tmp/unitary-lr-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing the wheels of .whl/ failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

limit_of() {  # limit_of PART: seconds for the part (LIMIT_<PART> or PART_TIMEOUT), within BUDGET
    local key="LIMIT_${1//[^A-Za-z0-9]/_}"
    local own=${!key:-$limit}
    local left=$((deadline - SECONDS))
    echo $((own < left ? own : left))
}

# part FILE PART COMMAND...: the command's output appended to $out/FILE.txt
# (eight files at most come back, so several parts share one), under the
# part's limit; SIGINT at the limit (pytest then prints its summary so far),
# SIGKILL 15 s later.
part() {
    local file=$1 name=$2
    shift 2
    local seconds
    seconds=$(limit_of "$name")
    echo "== $name: $*" >>"$out/$file.txt"
    if [ "$seconds" -lt 10 ]; then
        echo "== $name: skipped, $seconds s of BUDGET left" | tee -a "$out/$file.txt"
        return
    fi
    local start=$SECONDS
    timeout -s INT -k 15 "$seconds" "$@" >>"$out/$file.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s (limit $seconds s)" | tee -a "$out/$file.txt"
}

{
    date -u
    git log -1 --format='commit %H %s' 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    "$py" - <<'PY'
import importlib, platform
print("python", platform.python_version(), platform.machine())
for name in ("numpy", "scipy", "array_api_compat", "array_api_strict", "torch", "jax", "jaxlib", "optax", "cupy",
             "geoopt", "geotorch"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # noqa: BLE001 - a report, not a check
        print(name, "missing:", type(error).__name__)
try:
    import torch
    print("torch cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
except Exception:
    pass
try:
    import jax
    print("jax devices", jax.devices())
except Exception:
    pass
PY
} >"$out/versions.txt" 2>&1
cat "$out/versions.txt"

# the parts, each with its own name for LIMIT_<name>
bench_torch() {
    # shellcheck disable=SC2086  # the size lists are meant to split
    part bench-torch-float32 bench-torch-float32 "$py" -m unitary_lr bench --backend torch --device "$device" \
        --dtype float32 --sizes $sizes --ranks 1 8 --dense-max "$dense_max" --repeat 9 --no-progress \
        --json "$json/torch-float32.json"
}

bench_more() {
    # shellcheck disable=SC2086
    part bench-torch-complex64 bench-torch-complex64 "$py" -m unitary_lr bench --backend torch --device "$device" \
        --dtype complex64 --sizes $complex_sizes --ranks 1 8 --dense-max "$dense_max" --repeat 9 --no-progress \
        --json "$json/torch-complex64.json"
    # shellcheck disable=SC2086
    part bench-jax-cupy bench-jax "$py" -m unitary_lr bench --backend jax --device "$jax_device" --dtype float32 \
        --sizes $jax_sizes --dense-max 0 --repeat 9 --no-progress --json "$json/jax-float32.json"
}

bench_peers() {
    # shellcheck disable=SC2086
    part bench-peers bench-peers "$py" -m unitary_lr bench --peers --backend torch --device "$device" \
        --dtype float32 --sizes $peer_sizes --columns 256 1024 --dense-max 4096 --repeat 5 --no-progress \
        --json "$json/peers.json"
}

bench_cupy() {
    if [ "$device" != cpu ]; then
        # shellcheck disable=SC2086
        part bench-jax-cupy bench-cupy "$py" -m unitary_lr bench --backend cupy --dtype float32 \
            --sizes $jax_sizes --dense-max 0 --repeat 9 --no-progress --json "$json/cupy-float32.json"
    fi
}

stacked() {
    # several unitary parameters of one shape: one batched optimizer step against separate ones
    # shellcheck disable=SC2086
    part bench-peers stacked "$py" docs/scripts/stacked_optimizer.py --device "$device" \
        --sizes $complex_sizes --counts 2 8 --ranks 1 8 --rounds 9
}

probe() {
    # TF32 products (JAX's default on GPUs, torch's after set_float32_matmul_precision("high"))
    # against unitarity; host synchronisations of one eager CUDA step
    part bench-torch-float32 precision-probe "$py" docs/scripts/precision_probe.py --device "$device" \
        --n "$probe_n" --steps 20
    # where a step's time goes: host against wall time, kernels, copies and waits per
    # step, the largest kernels, eager and captured; the thin products' forms on cuBLAS
    # shellcheck disable=SC2086  # the size list is meant to split
    part bench-torch-float32 step-profile "$py" docs/scripts/step_profile.py --device "$device" \
        --sizes $peer_sizes --steps 20
    # the rank-r update as one addmm_ against 8-row blocks (slow on the CPU's MKL for
    # float32 rows a multiple of 2 KiB apart; does cuBLAS have a like case?)
    # (a dry run on the CPU times the smallest shapes only)
    local entries=1073741824
    [ "$device" = cpu ] && entries=300000
    part bench-torch-float32 update-forms "$py" docs/scripts/update_forms.py --device "$device" --rounds 15 \
        --max-entries "$entries"
}

capture_tests() {
    # the CUDA-graph capture of a capturable optimizer step, the optimizer on CUDA and
    # the lean eager rank-1 step there (the eager float32 step of the targets)
    part tests capture-tests "$py" -m pytest -q -p no:cacheprovider -rfE tests/test_capturable.py \
        tests/test_optim.py tests/test_torch_lean.py -k "cuda or graph"
}

matrix_tests() {
    # the kernel tests on the GPU backends of the test matrix; workers where pytest-xdist is
    # (about 2,500 tests: 90 % in 175 s with 14 workers on an H200). Each result is
    # printed as it comes (-v), since pytest under xdist prints no summary when
    # stopped at the limit; the names of the failures are listed at the end.
    local workers=()
    # (pytest-benchmark, where installed, refuses xdist's workers unless disabled)
    "$py" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-12}" -p no:benchmark)
    part tests matrix-tests "$py" -m pytest -v -p no:cacheprovider -rfE --tb=short "${workers[@]}" \
        -k "(cuda or gpu or cupy) and not test_capturable" tests
    {
        echo "== matrix-tests: $(grep -c ' PASSED ' "$out/tests.txt") passed; the failures:"
        grep -E ' (FAILED|ERROR) ' "$out/tests.txt" | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' | sort -u
    } >>"$out/tests.txt"
}

copy() {
    # issue 11, item 6: a shortened quick copy task on the GPU, eager and with the
    # model's step compiled, and on this machine's CPU: "later steps ms" compares them
    part copy copy-cpu "$py" -m unitary_lr copy --quick --steps "$copy_steps" --device cpu --threads "$(nproc)" \
        --no-plot --no-progress --out "$json/copy-cpu"
    part copy copy-gpu "$py" -m unitary_lr copy --quick --steps "$copy_steps" --device "$device" \
        --no-plot --no-progress --out "$json/copy"
    part copy copy-compiled "$py" -m unitary_lr copy --quick --steps "$copy_steps" --device "$device" --compile \
        --no-plot --no-progress --out "$json/copy-compiled"
    # the paper's T = 1000, whose unrolled graph failed to compile before the
    # loop was compiled in chunks (2026-12-06): compile time and later steps
    part copy copy-compiled-T1000 "$py" -m unitary_lr copy --quick --T 1000 --steps "$copy_long_steps" \
        --device "$device" --compile --eval-every 1000 --no-plot --no-progress --out "$json/copy-compiled-T1000"
}

case $what in
    bench) bench_torch; probe; bench_more; bench_peers; bench_cupy; stacked ;;
    tests) capture_tests; matrix_tests ;;
    copy) copy ;;
    all) capture_tests; bench_torch; probe; bench_more; matrix_tests; bench_peers; bench_cupy; copy; stacked ;;
    *) echo "usage: $0 [bench|tests|copy|all]" >&2; exit 2 ;;
esac
for file in "$out"/*.txt; do
    [ "$file" = "$out/versions.txt" ] || { echo "### $file"; grep -v '^\.*$' "$file" | tail -n 25; }
done
tar -czf "$out/bench-json.tar.gz" -C "$json" .
rm -rf "$json"
