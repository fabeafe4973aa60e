"""Host time of an eager split-KV decode call (TVM-FFI path): enqueue-only loop, then cProfile."""
import cProfile, pstats, time, torch
import cute_kernels, fa3py
dev = torch.device("cuda")
print("tvm_ffi", cute_kernels.use_tvm_ffi)
for b, sk, ns in ((1, 4096, "auto"), (1, 4096, "1"), (64, 4096, "auto")):
    cute_kernels.split_kv_setting = ns
    q = torch.randn(b, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(b, sk, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    f = lambda: fa3py.attention(q, k, v, backend="cute")
    for _ in range(20): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(200): f()
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    print(f"b{b} sk{sk} splits={ns}: host {1e6*(t1-t0)/200:.1f} us/call, with sync {1e6*(t2-t0)/200:.1f}")
cute_kernels.split_kv_setting = "auto"
q = torch.randn(1, 1, 32, 128, device=dev, dtype=torch.bfloat16)
k, v = (torch.randn(1, 4096, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
pr = cProfile.Profile(); pr.enable()
for _ in range(200): fa3py.attention(q, k, v, backend="cute")
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
