# Host time per call (enqueue-only loop) and a cProfile of 200 calls: decoding with GQA packing vs MHA 1k.
import torch, fa3py, cProfile, pstats, time
torch.manual_seed(0)
B, H, HKV, D, sk = 64, 32, 4, 128, 1024
q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, sk, HKV, D, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
q2 = torch.randn(B, 1024, H, D, device="cuda", dtype=torch.bfloat16)
k2 = torch.randn(B, 1024, H, D, device="cuda", dtype=torch.bfloat16)
for name, args in (("decode packed", (q, k, v)), ("mha 1k", (q2, k2, k2))):
    f = lambda: fa3py.attention(*args)
    for _ in range(20): f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200): f()
    host = (time.perf_counter() - t) / 200 * 1e6
    torch.cuda.synchronize()
    print(f"{name}: host {host:.1f} us/call (enqueue only)")
    pr = cProfile.Profile(); pr.enable()
    for _ in range(200): f()
    pr.disable(); torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)
