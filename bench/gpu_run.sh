#!/usr/bin/env bash
# Issue 9 part B in one device command: install what the GPU image lacks from carried wheels,
# run tests/gpu with CUDA required, then bench.gpu. Logs and results go to $OUT (the device
# tool's folder) or bench/results. Each step has its own time limit, so a hang in one still
# leaves the others' output.
#
#   bench/gpu_run.sh [WHEELS_DIR]        (TEST_SECONDS, BENCH_SECONDS, SECTIONS to narrow it)
#
# The wheels: ../shared/tools/gpu-wheels.sh DIR, plus what that script predates (same flags:
# --python-version 3.12 --platform manylinux_2_28_x86_64): msgspec, obstore, and setuptools and
# wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
wheels=${1:-.gpu-wheels}
mkdir -p "$out" bench/results
export PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  uname -a; id; } > "$out/env.txt" 2>&1
if ! timeout 240 make venv WHEELS="$wheels" PYTHON=python3 > "$out/setup.log" 2>&1; then
    echo "== setup failed"; tail -40 "$out/setup.log"; exit 1
fi
echo "== tests/gpu"
timeout "${TEST_SECONDS:-210}" make test-gpu WHEELS="$wheels" 2>&1 | tee "$out/test-gpu.log" |
    grep -vE "^\s*$" | tail -60
tests=${PIPESTATUS[0]}
echo "== bench.gpu"
budget=${BENCH_SECONDS:-300}
timeout "$budget" .venv/bin/python -m bench.gpu --budget $((budget - 40)) \
    --sections "${SECTIONS:-sharing,eviction,load,fuse,hot}" --out "$out/gpu.json" 2>&1 |
    tee "$out/bench.log" | tail -150
bench=${PIPESTATUS[0]}
cp "$out/gpu.json" bench/results/gpu.json 2>/dev/null
echo "== tests/gpu exit $tests, bench.gpu exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
