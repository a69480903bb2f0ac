#!/usr/bin/env bash
# The GPU measurements and tests of the launch-lean targets (docs/benchmarks.md,
# "Launch-lean steps") in one call on a machine with an NVIDIA GPU.
#
#   bash docs/scripts/gpu_targets.sh [bench|tests|copy|all]    (default: all)
#
# Writes at most eight files to $OUT (or ./gpu-results): versions.txt, one log
# per part and bench-json.tar.gz with the bench's JSON records. Each part has
# its own time limit (PART_TIMEOUT seconds, default 300) and a failing part
# does not stop the others.
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
#   DEVICE=cpu SIZES="64 128" COMPLEX_SIZES=64 PEER_SIZES=128 PART_TIMEOUT=120 bash docs/scripts/gpu_targets.sh
set -uo pipefail
cd "$(dirname "$0")/../.."

part=${1:-all}
out=${OUT:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
jax_device=$([ "$device" = cpu ] && echo cpu || echo gpu)
sizes=${SIZES:-"512 1024 4096 8192 16384"}
complex_sizes=${COMPLEX_SIZES:-"1024 4096 16384"}
peer_sizes=${PEER_SIZES:-"1024 4096"}
limit=${PART_TIMEOUT:-300}
json=$(mktemp -d)
export PYTHONUNBUFFERED=1

site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    site=/tmp/unitary-lr-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing the wheels of .whl/ failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run NAME COMMAND...: the command's output in $out/NAME.txt, under the time limit
    local name=$1
    shift
    echo "== $name: $*" | tee "$out/$name.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
    tail -n 40 "$out/$name.txt"
}

also() {  # also NAME LABEL COMMAND...: one more command into $out/NAME.txt (eight files at most come back)
    local name=$1 label=$2
    shift 2
    timeout "$limit" "$@" >>"$out/$name.txt" 2>&1
    echo "== $label: exit $?" | tee -a "$out/$name.txt"
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

bench() {
    # shellcheck disable=SC2086  # the size lists are meant to split
    run bench-torch-float32 "$py" -m unitary_lr bench --backend torch --device "$device" --dtype float32 \
        --sizes $sizes --ranks 1 8 --dense-max 8192 --repeat 9 --no-progress --json "$json/torch-float32.json"
    # shellcheck disable=SC2086
    run bench-torch-complex64 "$py" -m unitary_lr bench --backend torch --device "$device" --dtype complex64 \
        --sizes $complex_sizes --ranks 1 8 --dense-max 4096 --repeat 9 --no-progress --json "$json/torch-complex64.json"
    # shellcheck disable=SC2086
    run bench-jax-cupy "$py" -m unitary_lr bench --backend jax --device "$jax_device" --dtype float32 \
        --sizes $complex_sizes --dense-max 0 --repeat 9 --no-progress --json "$json/jax-float32.json"
    if [ "$device" != cpu ]; then
        # shellcheck disable=SC2086
        also bench-jax-cupy "cupy bench" "$py" -m unitary_lr bench --backend cupy --dtype float32 \
            --sizes $complex_sizes --dense-max 0 --repeat 9 --no-progress --json "$json/cupy-float32.json"
    fi
    # shellcheck disable=SC2086
    run bench-peers "$py" -m unitary_lr bench --peers --backend torch --device "$device" --dtype float32 \
        --sizes $peer_sizes --columns 256 1024 --dense-max 4096 --repeat 5 --no-progress --json "$json/peers.json"
    # several unitary parameters of one shape: one batched optimizer step against separate ones
    # shellcheck disable=SC2086
    also bench-peers "stacked optimizer" "$py" docs/scripts/stacked_optimizer.py --device "$device" \
        --sizes $complex_sizes --counts 2 8 --ranks 1 8 --rounds 9
    if [ "$device" != cpu ]; then
        # the framework-free optimizer's step_many on CuPy arrays
        # shellcheck disable=SC2086
        also bench-peers "stacked step_many (cupy)" "$py" docs/scripts/stacked_optimizer.py --frontend optim \
            --device "$device" --sizes $complex_sizes --counts 2 8 --ranks 1 8 --rounds 9
    fi
    tar -czf "$out/bench-json.tar.gz" -C "$json" .
}

tests() {
    # the kernel tests on the GPU backends of the test matrix, then the
    # CUDA-graph capture of a capturable optimizer step
    run tests "$py" -m pytest -q -p no:cacheprovider -x -k "cuda or gpu or cupy" tests
}

copy() {
    # issue 11, item 6: the quick copy task on the GPU, eager and with the
    # model's step compiled (its times against a CPU run of the same command)
    run copy "$py" -m unitary_lr copy --quick --device "$device" --out "$json/copy"
    also copy "copy --compile" "$py" -m unitary_lr copy --quick --device "$device" --compile --out "$json/copy-compiled"
}

case $part in
    bench) bench ;;
    tests) tests ;;
    copy) copy ;;
    all) tests; bench; copy ;;
    *) echo "usage: $0 [bench|tests|copy|all]" >&2; exit 2 ;;
esac
rm -rf "$json"
