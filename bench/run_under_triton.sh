#!/usr/bin/env bash
# Runs pytest with the Triton installed in TRITON_DIR instead of the
# environment's own, e.g. in CI:
#
#   pip install --no-deps --target /tmp/triton-3.5 triton==3.5.1
#   bash bench/run_under_triton.sh /tmp/triton-3.5            # the interpreter tests
#   bash bench/run_under_triton.sh /tmp/triton-3.5 tests/test_offline_compile.py -q
#
# Without pytest arguments it runs every test of the Triton kernel (its rows of
# the agreement table and of the API and contract tests, test_triton.py), the
# offline compile and kernel report tests and the GPU scripts' dry runs; not
# the slow compile of every launch (add -m "slow or not slow"), which
# bench/triton_versions.py covers for every release and which would take CI
# close to its 30 minutes on a cold Triton cache. PYTHON picks the interpreter (default: python).
# Stops with status 2 when TRITON_DIR holds no Triton or another Triton is
# imported instead.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -d "$1/triton" ]; then
    echo "usage: $0 TRITON_DIR [pytest arguments]  (TRITON_DIR: a pip --target folder holding triton/)" >&2
    exit 2
fi
dir="$(cd "$1" && pwd)"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
# The folder first, then this checkout: its triton shadows any installed one.
export PYTHONPATH="$dir:$root${PYTHONPATH:+:$PYTHONPATH}"
found="$("$python" -c 'import triton; print(triton.__version__, triton.__file__)')"
case "${found#* }" in
    "$dir"/*) echo "triton ${found% *} from $dir" >&2 ;;
    *) echo "$0: imported triton ${found}, not the one in $dir" >&2; exit 2 ;;
esac
cd "$root"
if [ $# -eq 0 ]; then
    set -- tests -q -k "triton or kernel_report or offline_compile or gpu_scripts"
fi
exec "$python" -m pytest "$@"
