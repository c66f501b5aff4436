#!/usr/bin/env bash
# The project's published GPU figures, in one call on a CUDA machine:
#   bash bench/gpu_suite.sh              (everything; sized for the device tool's 10 min)
#   bash bench/gpu_suite.sh tests micro  (only some parts: tests, memcheck, micro, train)
# 1. builds the native CPU kernel in place (the GPU machine cannot pip install);
# 2. runs the whole test suite with CUDA present (Triton compiled, CUDA-graph
#    and torch.compile tests enabled) and writes a summary JSON;
# 3. runs compute-sanitizer memcheck on one fused call;
# 4. runs the microbenchmarks (the Triton issue's preset, then the sweep);
# 5. runs the trainer's throughput comparison (ViT-B/16, batch 256, bf16).
# Every JSON names the device, torch and triton versions and the git commit;
# all of it lands in bench/results/ (and in $OUT when the device tool runs it).
# Steps go on after a failure so that one broken step still leaves the others'
# figures; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RES=bench/results
mkdir -p "$RES"
DEV=$($PY -c "import torch; n=torch.cuda.get_device_name(0).lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.replace(' ', '-'))")
PARTS=${*:-tests memcheck micro train}
want() { [[ " $PARTS " == *" $1 "* ]]; }
# The full microbenchmark sweep alone runs longer than one 10-minute device
# call; the sweep stops starting new series after this many seconds and lists
# the ones it skipped (run `micro` alone with a larger value for all of them).
MICRO_TIME_LIMIT=${MICRO_TIME_LIMIT:-150}
fail=0
step() { echo; echo "=== $*"; "$@" || { echo "!!! step failed: $*"; fail=1; }; }

step $PY setup.py build_ext --inplace -q

if want tests; then
step $PY -m pytest tests bench -q -p no:cacheprovider --junitxml="$RES/gpu-tests-$DEV.xml"
$PY - "$RES/gpu-tests-$DEV.xml" "$RES/gpu-tests-$DEV.json" <<'EOF'
import json, subprocess, sys, xml.etree.ElementTree as ET
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
          if c.find("failure") is not None or c.find("error") is not None]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": tv,
           "commit": commit, **counts, "failed": failed}, open(sys.argv[2], "w"), indent=1)
print(open(sys.argv[2]).read())
EOF
fi

if want memcheck && command -v compute-sanitizer >/dev/null; then
  step compute-sanitizer --tool memcheck --error-exitcode 9 --log-file "$RES/gpu-memcheck-$DEV.log" $PY -c "
import torch, pgs_kernels
x = torch.randn(8, 3, 224, 224, device='cuda')
t = torch.randn(8, 196, 768, device='cuda', dtype=torch.bfloat16)
s = pgs_kernels.pgs_select(x, t, token_weight=0.5, return_scores=True, backend='triton')
torch.cuda.synchronize(); print('memcheck call ok', tuple(s.keep_idx.shape))
"
  cat "$RES/gpu-memcheck-$DEV.log"
fi

if want micro; then
  step $PY bench/micro.py --device cuda --issue3 --out "$RES/micro-issue3-$DEV.json"
  step $PY bench/micro.py --device cuda --time-limit "$MICRO_TIME_LIMIT" --out "$RES/micro-$DEV.json"
fi
if want train; then
  step $PY bench/throughput.py --device cuda --out "$RES/train-$DEV.json"
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  # the device tool returns at most 8 files: the JSON, plots and the memcheck log
  cp "$RES"/*"$DEV"*.json "$RES"/*"$DEV"*.png "$RES"/*"$DEV"*.log "$OUT"/ 2>/dev/null || true
fi
echo; echo "gpu suite done on $DEV, failures: $fail"
exit $fail
