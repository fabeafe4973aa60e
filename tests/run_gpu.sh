#!/usr/bin/env bash
# Every GPU test of the repo, in parallel partitions (kernel compiles dominate and are CPU-bound).
# Needs a CUDA GPU and, for the cute tests, nvidia-cutlass-dsl. Logs: ${OUT:-/tmp}/gpu_tests/*.log
#   bash tests/run_gpu.sh            # GPU_TEST_TIMEOUT=420 seconds per partition by default
#   CUTE_SHARDS=3 ONLY=cute bash tests/run_gpu.sh   # the cute tests alone, in 3 parallel shards
#   BWD_SHARDS=6 ONLY=bwd bash tests/run_gpu.sh     # the backward kernel's ~620 tests in 6 shards
#   BWD_SHARDS=8 ONLY=bwd_variants bash tests/run_gpu.sh  # the backward's non-default tiles (~500 tests)
#   ONLY="bwd bwd_api" bash tests/run_gpu.sh        # the cute backward alone: its kernel's tests
#     (bwd), and the cross-backend and randomized API tests with it off (FA3PY_CUTE_BWD=0: the
#     Triton backward takes the cute forward's out / LSE); BWD_TEST_TIMEOUT=900 seconds each
# The cute kernels are called through TVM-FFI when apache-tvm-ffi (and, for torch < 2.10,
# torch-c-dlpack-ext) is importable, else through from_dlpack: the first line says which.
# Exits non-zero when there is no GPU (nothing runs) or when any partition fails.
set -u
if ! why=$(python3 -c "
import torch
from fa3py.dispatch import cuda_missing
why = cuda_missing(torch.device('cuda'))
print(why or '')
raise SystemExit(1 if why else 0)" 2>&1); then
    echo "run_gpu.sh: no GPU tests ran: ${why:-torch could not be imported}" >&2
    exit 1
fi
out=${OUT:-/tmp}/gpu_tests
mkdir -p "$out"
rm -f "$out"/*.log "$out"/*.rc
python3 -c "import cute_kernels as c; print('cute_kernels calling path:', 'tvm-ffi' if c.launch.use_tvm_ffi else 'from_dlpack')" \
    || echo "cute_kernels cannot be imported: the cute tests will fail (pip install -e \".[hopper]\")"
run() {
    local name=$1; shift
    # a test running past GPU_TEST_STALL seconds gets every thread's traceback in the log (a stall
    # shows where it waits; the paged tests stalled with nothing to say so)
    timeout "${GPU_TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider --tb=short \
        -o faulthandler_timeout="${GPU_TEST_STALL:-150}" "$@" \
        > "$out/$name.log" 2>&1
    local rc=$?
    echo "$rc" > "$out/$name.rc"
    echo "$name (exit $rc): $(grep -E '(passed|failed|error)' "$out/$name.log" | tail -1)"
}
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
sharded() {  # name shards pytest-args...: the gpu tests the args select, in `shards` processes
    local name=$1 shards=$2; shift 2
    if [ "$shards" -gt 1 ]; then
        python3 -m pytest -q -p no:cacheprovider --collect-only "$@" 2>/dev/null | grep '::' > "$out/${name}_ids.txt"
        for i in $(seq 0 $((shards - 1))); do
            # (test ids may hold spaces: one argument per line)
            readarray -t ids < <(awk -v n="$shards" -v i="$i" 'NR % n == i' "$out/${name}_ids.txt")
            # each shard starts i / shards of the way into its list, so the shards first meet
            # different kernel configs and find the others' in the shared disk cache later,
            # rather than all compiling the same ones at once
            local k=$(( i * ${#ids[@]} / shards ))
            ids=("${ids[@]:k}" "${ids[@]:0:k}")
            run "${name}_$i" "${ids[@]}" &
        done
    else
        run "$name" "$@" &
    fi
}
want cute && sharded cute "${CUTE_SHARDS:-1}" -m gpu tests/test_cute_*.py --ignore=tests/test_cute_bwd_gpu.py
want triton_features && run triton_features tests/test_triton.py -k test_features &
want triton_long && run triton_long tests/test_triton.py -k test_gpu_long &
want triton_rest && run triton_rest tests/test_triton.py -k "not test_features and not test_gpu_long" &
# gradients across backends (cute forward -> its backward) and the randomized API test
want cross && run cross -m gpu tests/test_cross_backend.py tests/test_api_random.py &
# the cute backward kernel (its own partitions: the kernel compiles per feature set)
want bwd && GPU_TEST_TIMEOUT=${BWD_TEST_TIMEOUT:-900} sharded bwd "${BWD_SHARDS:-1}" -m gpu tests/test_cute_bwd_gpu.py
# the backward's other tiles (hdim 64's 64 rows, hdim 128's 80 rows at every size, hdim 192's
# 64 x 64), with two sdS buffers where the tile takes them, and the 80-row rule; the pre / post kernels
want bwd_variants && FA3PY_CUTE_BWD_DS_STAGES=2 GPU_TEST_TIMEOUT=${BWD_TEST_TIMEOUT:-900} \
    sharded bwd_variants "${BWD_SHARDS:-1}" -m gpu tests/test_cute_bwd_gpu.py -k "variant_tile or m80_rule"
want bwd_variants && run bwd_prepost tests/test_cute_bwd_prepost.py &
want bwd_api && FA3PY_CUTE_BWD=0 GPU_TEST_TIMEOUT=${BWD_TEST_TIMEOUT:-900} \
    run bwd_api -m gpu tests/test_cross_backend.py tests/test_api_random.py &
want api && run api tests/test_attention.py tests/test_validation.py tests/test_dispatch.py tests/test_reference.py tests/test_benchmarks.py \
    tests/test_chunk.py tests/test_kvcache.py tests/test_mla.py tests/test_compile.py &
want fp8 && run fp8 tests/test_fp8.py tests/test_fp8_prep.py tests/test_fp8_triton.py &
wait
grep -h "^FAILED\|^ERROR" "$out"/*.log 2>/dev/null | head -40
status=0
for f in "$out"/*.rc; do
    [ -e "$f" ] || { echo "run_gpu.sh: no partition ran (ONLY=${ONLY:-})" >&2; exit 1; }
    [ "$(cat "$f")" = 0 ] || status=1
done
exit $status
