#!/usr/bin/env bash
# The whole test suite under another torch/Triton pair, on the CPU, recorded:
#
#   bash bench/suite_under_torch.sh 2.9.1 3.5.1                  # -> bench/out/tests-torch-2.9.1.json
#   bash bench/suite_under_torch.sh 2.15.0 3.9.0 --refresh       # -> bench/results/tests-torch-2.15.0.json
#
# A fresh virtual environment (bench/out/venv-torch-VERSION, kept for reruns)
# gets that torch (on Linux x86-64 PyPI serves the CUDA build, which runs on
# the CPU; about 3 GB), that Triton and the test tools of requirements.txt.
# The suite runs on a git worktree of HEAD (so the record names a commit and
# this checkout's own native build is left alone): the native kernel built
# against that torch, then `python -m pytest` with CI=true, each test's
# outcome logged as it ends (bench/pytest_log.py), and the summary written.
# Exit status: pytest's.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
TORCH=$1 TRITON=$2
shift 2
DEST_DIR=bench/out
[ "${1:-}" = "--refresh" ] && DEST_DIR=bench/results
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV="$ROOT/bench/out/venv-torch-$TORCH"
OUT="$ROOT/$DEST_DIR/tests-torch-$TORCH.json"
LOG="$ROOT/bench/out/tests-torch-$TORCH.jsonl"
mkdir -p "$ROOT/bench/out" "$ROOT/$DEST_DIR"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || exit 1
fi
# torch and Triton as asked; the rest as the README's environment pins it.
tools=$(grep -v -E '^\s*(#|$|torch==|triton==)' requirements.txt)
"$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" $tools || exit 1

TREE=$(mktemp -d)
git worktree add -q --detach "$TREE" HEAD || exit 1
trap 'git worktree remove --force "$TREE"' EXIT
cd "$TREE"
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . || exit 1
CI=true "$VENV/bin/python" -m pytest -q -p no:cacheprovider --rootdir="$TREE" -p bench.pytest_log --log-jsonl="$LOG"
rc=$?
"$VENV/bin/python" -m bench.pytest_log "$LOG" --out "$OUT" --status "pytest exit $rc" >/dev/null
echo "suite under torch $TORCH, triton $TRITON: exit $rc, summary in $OUT"
exit $rc
