#!/usr/bin/env bash
# Every GPU test of the repo, in parallel partitions (kernel compiles dominate and are CPU-bound).
# Needs a CUDA GPU and, for the cute tests, nvidia-cutlass-dsl. Logs: ${OUT:-/tmp}/gpu_tests/*.log
#   bash tests/run_gpu.sh            # GPU_TEST_TIMEOUT=420 seconds per partition by default
#   CUTE_SHARDS=3 ONLY=cute bash tests/run_gpu.sh   # the cute tests alone, in 3 parallel shards
# The cute kernels are called through TVM-FFI when apache-tvm-ffi (and, for torch < 2.10,
# torch-c-dlpack-ext) is importable, else through from_dlpack: the first line says which.
set -u
out=${OUT:-/tmp}/gpu_tests
mkdir -p "$out"
python3 -c "import cute_kernels as c; print('cute_kernels calling path:', 'tvm-ffi' if c.use_tvm_ffi else 'from_dlpack')"
run() {
    local name=$1; shift
    timeout "${GPU_TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --tb=short "$@" \
        > "$out/$name.log" 2>&1
    echo "$name (exit $?): $(grep -E '(passed|failed|error)' "$out/$name.log" | tail -1)"
}
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
shards=${CUTE_SHARDS:-1}
if want cute; then
    if [ "$shards" -gt 1 ]; then
        python3 -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/test_cute.py 2>/dev/null \
            | grep '::' > "$out/cute_ids.txt"
        for i in $(seq 0 $((shards - 1))); do
            # (test ids may hold spaces: one argument per line)
            readarray -t ids < <(awk -v n="$shards" -v i="$i" 'NR % n == i' "$out/cute_ids.txt")
            run "cute_$i" "${ids[@]}" &
        done
    else
        run cute -m gpu tests/test_cute.py &
    fi
fi
want triton_features && run triton_features tests/test_triton.py -k test_features &
want triton_long && run triton_long tests/test_triton.py -k test_gpu_long &
want triton_rest && run triton_rest tests/test_triton.py -k "not test_features and not test_gpu_long" &
want fp8 && run fp8 tests/test_fp8.py tests/test_fp8_prep.py tests/test_fp8_triton.py &
want api && run api tests/test_attention.py tests/test_validation.py tests/test_dispatch.py tests/test_reference.py tests/test_benchmarks.py &
wait
grep -h "^FAILED\|^ERROR" "$out"/*.log 2>/dev/null | head -40
