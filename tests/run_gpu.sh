#!/usr/bin/env bash
# Every GPU test of the repo, in parallel partitions (kernel compiles dominate and are CPU-bound).
# Needs a CUDA GPU and, for the cute tests, nvidia-cutlass-dsl. Logs: ${OUT:-/tmp}/gpu_tests/*.log
#   bash tests/run_gpu.sh            # GPU_TEST_TIMEOUT=420 seconds per partition by default
set -u
out=${OUT:-/tmp}/gpu_tests
mkdir -p "$out"
run() {
    local name=$1; shift
    timeout "${GPU_TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --tb=short "$@" \
        > "$out/$name.log" 2>&1
    echo "$name (exit $?): $(grep -E '(passed|failed|error)' "$out/$name.log" | tail -1)"
}
run cute -m gpu tests/test_cute.py &
run triton_features tests/test_triton.py -k test_features &
run triton_long tests/test_triton.py -k test_gpu_long &
run triton_rest tests/test_triton.py -k "not test_features and not test_gpu_long" &
run api tests/test_attention.py tests/test_validation.py tests/test_dispatch.py tests/test_reference.py &
wait
grep -h "^FAILED\|^ERROR" "$out"/*.log | head -40
