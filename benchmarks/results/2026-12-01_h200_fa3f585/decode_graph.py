# The script behind the decoding table in README.md (run on the H200 with the repo on PYTHONPATH).
import torch, triton, fa3py, cute_kernels
from fa3py.validation import make_request
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
torch.manual_seed(0)
B, H, HKV, D = 64, 32, 4, 128
for sk in (1024, 2048, 4096, 8192):
    for causal in (False, True):
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, sk, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cfg = cute_kernels.config_for(make_request(q, k, v, causal=causal))
        f = lambda: fa3py.attention(q, k, v, causal=causal)
        f(); torch.cuda.synchronize()
        eager = triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            o = f()
        graph = triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median")
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sd = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=False, enable_gqa=True)
            sd()
            cud = triton.testing.do_bench(sd, warmup=50, rep=300, return_mode="median")
        print(f"sk {sk:5d} causal {causal:d} cfg {cfg.short()} dyn {cfg.tile.dynamic} | fa3py eager {eager*1e3:6.1f} us graph {graph*1e3:6.1f} us | cudnn eager {cud*1e3:6.1f} us", flush=True)
