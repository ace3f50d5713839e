"""Measured GPU memory of max_memory plans beside their estimates (needs a CUDA GPU to mean anything).

    python benchmarks/gpu_memory.py                                   # SDXL shapes, the default grid
    python benchmarks/gpu_memory.py --sizes 2048x2048 4096x4096 --budgets none 12 8 --steps 2 --write
    python benchmarks/gpu_memory.py --kind tiny --device cpu --sizes 512x512 --budgets none   # smoke test

Random weights at the real shapes (demofusion.presets.random_components; nothing to download),
components waiting in CPU memory, the work on ``--device``. Each row is one run of the real
pipeline under ``max_memory`` (a few steps per phase: every step of a phase has the same peak),
after ``torch.cuda.empty_cache()`` and ``reset_peak_memory_stats()``. Columns, GiB:
*estimate*: the plan's peak (weights + activations + latents, then with the stated reserve);
*allocated* / *reserved*: ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()``;
*outside*: memory the device reports used beyond the allocator's (CUDA context, cuBLAS/cuDNN
workspaces), read with ``torch.cuda.mem_get_info`` at the end; *total* = reserved + outside, what
the budget must hold. ``--write`` puts the table in docs/benchmarks.md (``## GPU memory, measured``).
"""

from __future__ import annotations

import argparse
import time

import torch
from docsection import write_section

GiB = 2**30


def gib(n) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def build(kind: str, dtype, vae_dtype):
    from demofusion.pipeline import DemoFusionPipeline
    from demofusion.presets import random_components

    unet, vae, text, sched = random_components(kind, device="cpu", dtype=dtype)
    vae.to(vae_dtype)
    return unet, vae, text, sched, DemoFusionPipeline


def run_one(parts, device, h, w, budget, steps):
    *components, cls = parts
    pipe = cls(*components, device=device)
    kw = dict(height=h, width=w, num_inference_steps=steps, max_memory=budget, seed=0, output_type="pil")
    plan = pipe.memory_plan(**kw)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe("a lighthouse at dawn", **kw)
    seconds = time.perf_counter() - t0
    row = {"plan": plan, "seconds": seconds, "allocated": None, "reserved": None, "outside": None}
    if cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(device)
        row.update(allocated=torch.cuda.max_memory_allocated(device), reserved=torch.cuda.max_memory_reserved(device),
                   outside=total - free - torch.cuda.memory_reserved(device))
    return row


def table(rows) -> str:
    lines = ["| size | budget | plan | estimate (no reserve) | estimate | allocated | reserved | outside | total | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (h, w, budget), r in rows:
        p = r["plan"]
        bare = max(st.weights + st.activations + st.latents for st in p.stages)
        total = None if r["reserved"] is None else r["reserved"] + r["outside"]
        how = f"{p.offload}, vbs {p.view_batch_size}{' apart' if p.cfg_apart else ''}, tiles ×{p.decode_batch}"
        lines.append(f"| {h}×{w} | {budget or 'none'} | {how} | {gib(bare)} | {gib(p.peak_bytes)} | "
                     f"{gib(r['allocated'])} | {gib(r['reserved'])} | {gib(r['outside'])} | {gib(total)} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="sdxl-base")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", nargs="+", default=["2048x2048", "4096x4096", "2048x4096"])
    ap.add_argument("--budgets", nargs="+", default=["none", "24GiB", "12GiB", "8GiB"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--vae-dtype", default="fp32", help="the released SDXL VAE overflows in fp16")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    from demofusion.weights import parse_dtype

    dtype = torch.float16 if torch.device(args.device).type == "cuda" else torch.float32
    parts = build(args.kind, dtype, parse_dtype(args.vae_dtype))
    rows = []
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split("x"))
        for b in args.budgets:
            budget = None if b == "none" else b
            rows.append(((h, w, budget), run_one(parts, args.device, h, w, budget, args.steps)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else args.device
    text = (f"{args.kind}, {str(dtype)[6:]} UNet, VAE {args.vae_dtype}, {args.steps} steps per phase, on {name}.\n\n"
            f"```\npython benchmarks/gpu_memory.py {' '.join(argv or [])}\n```\n\n{table(rows)}\n")
    print(text)
    if args.write:
        write_section("GPU memory, measured", text)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
