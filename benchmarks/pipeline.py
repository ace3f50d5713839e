"""Pipeline benchmark: UNet evaluations, calls and wall time per phase; counted FLOPs.

    python benchmarks/pipeline.py --model tiny --height 768 --width 768 --steps 8
    python benchmarks/pipeline.py --count-only --height 4096 --width 4096 --steps 50
    python benchmarks/pipeline.py --model random:sdxl-base --device cuda --dtype fp16 --height 2048 --width 2048 --steps 50
    python benchmarks/pipeline.py --reference /path/to/pipeline_demofusion_sdxl.py [versus_reference.py's options]

``--model``: a weights path, ``tiny``, or ``random:sdxl-base`` / ``random:sdxl-turbo`` (the real
networks with seeded random weights: real shapes and cost, noise images, no download).
``--compile MODE`` compiles the UNet and runs the job once untimed first (``--warmup``).

``--reference PATH`` times our denoising against the PRIS-CV reference's on the CPU proxy
(benchmarks/versus_reference.py: same tiny weights, same job, alternating runs).

``--count-only`` prints the analytic work of a real SDXL run (single-sample 128² UNet
evaluations per phase × 6.76e12 FLOPs each, docs/benchmarks.md) without running anything. With a
model it runs the pipeline and reports per-phase UNet calls (batched) and seconds; on CUDA it
also reports peak memory and achieved TFLOP/s from the counted FLOPs (``--flops-per-eval``).
"""

from __future__ import annotations

import argparse
import time

import torch

from demofusion.pipeline.algorithm import view_layout
from demofusion.pipeline.work import unet_evaluations
from demofusion.pipeline.settings import validate

SDXL_FLOPS_128 = 6.76e12  # one UNet forward, batch 1, 128² latent (docs/benchmarks.md)
SDXL_FLOPS = {128: SDXL_FLOPS_128, 64: 1.59e12, 32: 4.28e11}  # by window (latent side)


def evaluations_per_phase(height, width, base=1024, steps=50, stride=64, guidance=True):
    """Single-sample UNet evaluations in each phase (the algorithm's view layout) × CFG × steps."""
    s = validate(base, prompt="x", height=height, width=width, num_inference_steps=steps, stride=stride,
                 guidance_scale=7.5 if guidance else 1.0, force=True)
    return unet_evaluations(s, view_layout)


def main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--reference" in argv:  # the comparison with the reference has its own options
        from versus_reference import main as versus

        i = argv.index("--reference")
        return versus([argv[i + 1], *argv[:i], *argv[i + 2:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stride", type=int, default=None, help="default: 64, or window/2 for small models")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--view-batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--count-only", action="store_true")
    ap.add_argument("--flops-per-eval", type=float, default=None,
                    help="FLOPs of one single-sample window evaluation (default: SDXL's, for the SDXL UNet only)")
    ap.add_argument("--compile", default=None, metavar="MODE", help="torch.compile the UNet: default, reduce-overhead, max-autotune")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1 with --compile, else 0)")
    a = ap.parse_args(argv)

    if a.count_only:
        ev = evaluations_per_phase(a.height, a.width, 1024, a.steps, a.stride or 64, a.guidance > 1)
        print(f"{a.height}×{a.width}, {a.steps} steps: single-sample 128² UNet evaluations per phase {ev} "
              f"= {sum(ev):,} ≈ {sum(ev) * (a.flops_per_eval or SDXL_FLOPS_128):.2e} FLOPs")
        return

    from demofusion import DemoFusionPipeline
    from demofusion.weights import parse_dtype

    dtype = parse_dtype(a.dtype)
    if a.model.startswith("random:"):
        from demofusion.presets import random_components

        pipe = DemoFusionPipeline(*random_components(a.model.split(":", 1)[1], device=a.device, dtype=dtype), name=a.model)
    else:
        pipe = DemoFusionPipeline.from_pretrained(a.model, device=a.device, dtype=dtype)
    if a.compile:
        pipe.compile(mode=None if a.compile == "default" else a.compile)
    window = pipe.base_size // 8
    stride = a.stride or (64 if window >= 128 else window // 2)
    job = dict(prompt="a lighthouse at dawn", height=a.height, width=a.width, num_inference_steps=a.steps,
               guidance_scale=a.guidance, stride=stride, view_batch_size=a.view_batch_size, seed=0,
               offload_text_encoders=False)
    for _ in range(a.warmup if a.warmup is not None else int(bool(a.compile))):
        pipe(**job)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = pipe(**job)
    total = time.perf_counter() - t0
    ev = evaluations_per_phase(a.height, a.width, pipe.base_size, a.steps, stride, a.guidance > 1)
    print(f"model={a.model} {a.height}×{a.width} steps={a.steps} stride={stride} view_batch_size={a.view_batch_size} "
          f"device={a.device} dtype={a.dtype} compile={a.compile}")
    is_sdxl = sum(p.numel() for p in pipe.unet.parameters()) > 2e9
    fpe = a.flops_per_eval or (SDXL_FLOPS.get(window) if is_sdxl else None)
    tflops = (lambda e, sec: f"{e * fpe / sec / 1e12:.1f}") if fpe else (lambda e, sec: "—")
    print("| phase | size | UNet calls | single-sample evaluations | seconds | TFLOP/s (counted) |")
    print("|---|---|---|---|---|---|")
    for k, (size, calls, e, sec) in enumerate(zip(out.phase_sizes, out.unet_calls, ev, out.timings), 1):
        print(f"| {k} | {size[0]}×{size[1]} | {calls} | {e} | {sec:.2f} | {tflops(e, sec)} |")
    print(f"total {total:.2f} s (text encoding and decoding included)"
          + (f"; {tflops(sum(ev), total)} TFLOP/s from counted UNet FLOPs ({fpe:.3g} per evaluation)" if fpe else ""))
    if a.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
