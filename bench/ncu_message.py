"""One layer's fused message step on DHFR's edges, forward + backward, once per label (bench_model.message_call),
for Nsight Compute: ncu --kernel-name regex:_message_ python3 bench/ncu_message.py fused_kernel,fused_gemm"""
import sys
from pathlib import Path
sys.path.insert(0, "bench")
import torch
import bench_model as bm
t, ei, n, e = bm.kernel_inputs("dhfr", Path(".benchdata"))
for label in sys.argv[1].split(","):
    m, u = bm.message_call(t, ei, label)
    torch.autograd.grad(m.sum() + u.square().sum(), [t[x] for x in bm.grad_inputs(label)])
torch.cuda.synchronize()
