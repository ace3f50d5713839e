"""SDXL UNet forward time, ours vs diffusers' UNet2DConditionModel (real SDXL base config).

    flock /tmp/df-bigmem.lock python benchmarks/unet.py [--device cpu] [--dtype bf16] [--latent 32x32] [--batch 2]

Random weights (values do not change the cost). Ours is built on the meta device and loaded
with diffusers' own tensors (shared, not copied), so both run on the same numbers and the run
needs one model's memory (~5 GB bf16, ~10 GB fp32). Repeats alternate between the two models
(order flipped every repeat) so load from other processes hits both alike; the median is reported.
"""

import argparse
import math
import statistics
import time

import torch

from shared import add_unet_flags, parse_unet_flags, unet_inputs

from demofusion.unet import UNet, UNetConfig
from demofusion.weights import build_and_load, parse_dtype

SDXL = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def reference(dtype, device):
    from diffusers import UNet2DConditionModel  # reference only (benchmark script)

    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(SDXL)
    ref = ref.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
            p.normal_(1.0 if p.ndim == 1 else 0.0, std, generator=g)
    return ref.to(dtype).eval().requires_grad_(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16")
    add_unet_flags(ap)
    ap.add_argument("--repeats", type=int, default=7)
    args, h, w = parse_unet_flags(ap)
    dtype, dev = parse_dtype(args.dtype), torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    ref = reference(dtype, dev)
    ours = build_and_load(lambda: UNet(UNetConfig.from_diffusers(SDXL)), ref.state_dict(), "UNet",
                          device=dev)
    b = args.batch
    x, t, ctx, pooled, ids = unet_inputs(b, h, w, dev, dtype)

    runs = {
        "diffusers": lambda: ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample,
        "ours": lambda: ours(x, t, ctx, pooled, ids),
    }
    times = {k: [] for k in runs}
    outs = {}
    with torch.inference_mode():
        for k, fn in runs.items():  # warm-up
            outs[k] = fn()
        for r in range(args.repeats):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                sync()
                t0 = time.perf_counter()
                runs[k]()
                sync()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = ((outs["ours"].float() - outs["diffusers"].float()).abs().max()
            / outs["diffusers"].float().abs().max()).item()
    flops = 4.28e11 * b * (h * w) / (32 * 32)  # docs/benchmarks.md count at 32², scaled by area (approx.)
    print(f"SDXL UNet forward, {dev.type} {args.dtype}, batch {b}, latent {h}x{w}, {args.repeats} repeats, "
          f"{args.threads} threads")
    for k in runs:
        print(f"  {k:9s} median {med[k] * 1e3:8.1f} ms  (min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f})"
              f"  ≈ {flops / med[k] / 1e12:.2f} TFLOP/s")
    print(f"  ours/diffusers = {med['ours'] / med['diffusers']:.3f}   output max|Δ|/max|ref| = {diff:.1e}")


if __name__ == "__main__":
    main()
