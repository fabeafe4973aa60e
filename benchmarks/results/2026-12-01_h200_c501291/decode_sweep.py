"""Split-KV decode sweep (H200): CUDA-graph replay time of fa3py's cute decode at forced split
counts and the automatic one, beside cuDNN (SDPA), plus the Triton combine alone.
hdim 128, 32 query / 4 KV heads, 1 query, bf16."""
import torch, torch.nn.functional as F
import cute_kernels, fa3py
from benchmarks.run import cuda_graph, time_ms
from fa3py.validation import make_request
from torch.nn.attention import sdpa_kernel, SDPBackend
from triton_fallback.combine import combine_splits

dev = torch.device("cuda")
t = lambda fn: 1000 * time_ms(cuda_graph(fn).replay, dev, 25, 100)
print("batch keys auto | " + " ".join(f"s={s:<3}" for s in (1, 2, 4, 8, 16, 32, 64)) + " | cudnn | combine(auto)  [us]")
for b in (1, 4, 16):
    for sk in (4096, 8192, 16384, 32768):
        q = torch.randn(b, 1, 32, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        req = make_request(q, k, v)
        cfg = cute_kernels.config_for(req)
        auto = cute_kernels.num_splits(req, cfg) if cfg.split_kv else 1
        row = []
        for s in ("auto", 1, 2, 4, 8, 16, 32, 64):
            cute_kernels.split_kv_setting = str(s)
            row.append(t(lambda: fa3py.attention(q, k, v, backend="cute")))
        cute_kernels.split_kv_setting = "auto"
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cud = t(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
        op = torch.randn(auto * b, 8, 4, 128, device=dev); lp = torch.randn(auto * b, 4, 8, device=dev)
        out = torch.empty(b, 8, 4, 128, device=dev, dtype=torch.bfloat16); lse = torch.empty(b, 4, 8, device=dev)
        comb = t(lambda: combine_splits(op, lp, auto, False, out, lse))
        print(f"{b:5d} {sk:5d} {auto:3d} {row[0]:6.1f} | " + " ".join(f"{x:5.1f}" for x in row[1:]) + f" | {cud:5.1f} | {comb:5.1f}", flush=True)
