"""Split-KV decode sweep with the in-kernel combine: CUDA-graph replay of fa3py's cute decode at
the automatic split count, forced 1 / 8 / 16 / 32, beside cuDNN. hdim 128, 32 / 4 heads, bf16."""
import torch, torch.nn.functional as F
import cute_kernels, fa3py
from benchmarks.run import cuda_graph, time_ms
from fa3py.validation import make_request
from torch.nn.attention import sdpa_kernel, SDPBackend

dev = torch.device("cuda")
t = lambda fn: 1000 * time_ms(cuda_graph(fn).replay, dev, 25, 100)
print("batch keys auto | fa3py auto  s=1   s=8  s=16  s=32 | cudnn | auto/cudnn  [us]")
for b in (1, 4, 16):
    for sk in (4096, 8192, 16384, 32768):
        q = torch.randn(b, 1, 32, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, 4, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        req = make_request(q, k, v)
        cfg = cute_kernels.config_for(req)
        auto = cute_kernels.num_splits(req, cfg) if cfg.split_kv else 1
        row = []
        for s in ("auto", 1, 8, 16, 32):
            cute_kernels.split_kv_setting = str(s)
            row.append(t(lambda: fa3py.attention(q, k, v, backend="cute")))
        cute_kernels.split_kv_setting = "auto"
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cud = t(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
        print(f"B{b:<4d} {sk:5d} {auto:3d} | " + " ".join(f"{x:6.1f}" for x in row) + f" | {cud:5.1f} | {row[0] / cud:.2f}", flush=True)
