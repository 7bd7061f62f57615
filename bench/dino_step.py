"""PyTorch side of the speed harness: the same DINO step as `examples/bench.rs` (teacher forward
on the global crops, student forward on all crops, DINO loss, backward, per-parameter gradient
clipping, AdamW, teacher EMA), or feature extraction, with the ViT of
python/torch_dino.py (the reference's layer structure: explicit attention, exact GELU).
Prints one JSON line: median seconds per step, images per second, peak RSS (and peak GPU memory
with --device cuda).

    python3 bench/dino_step.py --mode step --arch vit_tiny --patch 16 --batch 8 --out_dim 65536
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from torch_dino import Head, Vit, dino_loss  # noqa: E402

ARCHS = {"vit_micro": (64, 4, 2), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["step", "extract"], default="step")
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out_dim", type=int, default=65536)
    p.add_argument("--global_size", type=int, default=224)
    p.add_argument("--local_size", type=int, default=96)
    p.add_argument("--nlocal", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                   help="bf16 runs the forward passes (and the loss) under autocast (on CPUs oneDNN, AMX "
                        "where present), as the reference's mixed precision does on GPUs")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to time the same step on an NVIDIA GPU "
                   "(at f32 its matrix products stay f32: PyTorch leaves TF32 off for them unless "
                   "asked, though cuDNN's convolutions, here the patch embedding, use it)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dim, depth, heads = ARCHS[a.arch]
    dev = torch.device(a.device)
    vit = Vit(a.global_size, a.patch, dim, depth, heads, 4).to(dev)
    times = []

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def now():
        # GPU work is queued: a step's time ends when the device has finished it.
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    if a.mode == "extract":
        vit.eval()
        x = torch.randn(a.batch, 3, a.global_size, a.global_size, device=dev)
        with torch.no_grad(), autocast():
            for i in range(a.warmup + a.steps):
                t0 = now()
                vit(x)
                times.append(now() - t0)
    else:
        student = torch.nn.ModuleDict({"backbone": vit, "head": Head(dim, a.out_dim, 2048, 256, 3)})
        teacher = torch.nn.ModuleDict({"backbone": Vit(a.global_size, a.patch, dim, depth, heads, 4),
                                       "head": Head(dim, a.out_dim, 2048, 256, 3)})
        student.to(dev)
        teacher.to(dev)
        teacher.load_state_dict(student.state_dict())
        for q in teacher.parameters():
            q.requires_grad = False
        params = [q for q in student.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, eps=1e-8)
        center = torch.zeros(1, a.out_dim, device=dev)
        ncrops = 2 + a.nlocal
        for i in range(a.warmup + a.steps):
            g = torch.randn(2 * a.batch, 3, a.global_size, a.global_size, device=dev)
            l = torch.randn(a.nlocal * a.batch, 3, a.local_size, a.local_size, device=dev)
            t0 = now()
            with autocast():
                with torch.no_grad():
                    t_out = teacher["head"](teacher["backbone"](g))
                s_out = student["head"](torch.cat([student["backbone"](g), student["backbone"](l)]))
                loss, center, _, _ = dino_loss(s_out, t_out, center, ncrops, 0.04)
            opt.zero_grad()
            loss.backward()
            for q in params:
                if q.grad is not None:
                    norm = q.grad.norm(2)
                    q.grad.mul_(torch.clamp(3.0 / (norm + 1e-6), max=1.0))
            opt.step()
            with torch.no_grad():
                for qs, qt in zip(student.parameters(), teacher.parameters()):
                    qt.mul_(0.996).add_((1 - 0.996) * qs.detach())
            times.append(now() - t0)
    median = statistics.median(times[a.warmup:])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"impl": "pytorch " + torch.__version__, "device": a.device, "median_s": median,
              "img_per_s": a.batch / median, "peak_rss_mb": rss_mb}
    if dev.type == "cuda":
        # What PyTorch's allocator held at most (tensors and its cache; not the CUDA context).
        result["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
