"""fp8 UNet weights (demofusion.fp8) vs fp16/bf16/fp32 weights on the real-shaped SDXL UNet.

    flock /tmp/df-bigmem.lock python benchmarks/fp8.py [--latent 32x32] [--batch 2] [--threads 2]

Random weights (demofusion.presets.random_init_: matrices/convs ~ N(0, 1/fan_in), the real SDXL
base shapes, 2.57 B parameters). Every row runs the same inputs with compute in fp32 on the CPU,
so the error is that of the weight *storage* alone: "fp16" / "bf16" round every parameter through
that dtype; the fp8 rows round every parameter through fp16 first (the deployed fp16 model), then
store the Linear/Conv2d weights in float8_e4m3fn (conv_in/conv_out kept, see demofusion/fp8.py),
upcast per layer in forward. One model in memory at a time (~10 GB in fp32); rebuilt per group
of rows from the same seed. Errors are against the fp32 model: ‖Δ‖/‖ref‖ and max|Δ|/max|ref| of
the noise prediction, and the median / max over quantised layers of ‖ΔW‖/‖W‖.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from shared import add_unet_flags, parse_unet_flags, unet_inputs

from demofusion.fp8 import DEFAULT_SKIP, is_fp8, to_fp8_, weight_bytes
from demofusion.presets import random_init_
from demofusion.unet import UNet, UNetConfig

GB = 1e9


def build(seed: int) -> UNet:
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset("sdxl-base"))
    return random_init_(unet.to_empty(device="cpu"), seed).eval().requires_grad_(False)


def round_through_(unet: UNet, dtype) -> UNet:
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.to(dtype))
    return unet


def quantise_(unet: UNet, scale) -> list:
    """to_fp8_ layer by layer (same result as to_fp8_(unet)), returning each layer's ‖ΔW‖/‖W‖."""
    errs = []
    for name, m in list(unet.named_modules()):
        if type(m) in (nn.Linear, nn.Conv2d) and name not in DEFAULT_SKIP:
            w = m.weight.detach().clone()
            to_fp8_(m, scale=scale, skip=())
            errs.append(((m.dequantised_weight(torch.float32) - w).norm() / w.norm()).item())
    assert is_fp8(unet) and unet.dtype == torch.float32
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_unet_flags(ap)
    ap.add_argument("--seed", type=int, default=0)
    args, h, w = parse_unet_flags(ap)
    b = args.batch
    inputs = unet_inputs(b, h, w)

    rows, ref = [], None

    def run(label, unet, layer_errs=None, nbytes=None):
        nonlocal ref
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = unet(*inputs)
        dt = time.perf_counter() - t0
        assert torch.isfinite(y).all(), label
        if ref is None:
            ref = y
        d = y - ref
        nbytes = nbytes() if callable(nbytes) else nbytes  # after the forward: may re-type the model
        lw = ("—" if not layer_errs else f"{statistics.median(layer_errs):.4f} / {max(layer_errs):.4f}")
        rows.append((label, (d.norm() / ref.norm()).item(), (d.abs().max() / ref.abs().max()).item(), lw,
                     nbytes, dt))
        print(f"  {label}: done in {dt:.1f} s", flush=True)

    unet = build(args.seed)  # group 1: fp32 reference, bf16-stored
    n_params = sum(p.numel() for p in unet.parameters())
    run("fp32 weights (reference)", unet, nbytes=4 * n_params)
    run("bf16 weights", round_through_(unet, torch.bfloat16), nbytes=2 * n_params)
    del unet

    unet = round_through_(build(args.seed), torch.float16)  # group 2: fp16, fp8 per-tensor scale
    run("fp16 weights", unet, nbytes=2 * n_params)
    errs = quantise_(unet, "tensor")
    run("fp8 e4m3 + per-tensor scale", unet, errs, lambda: weight_bytes(unet.half()))  # as deployed: fp16 rest
    del unet

    unet = round_through_(build(args.seed), torch.float16)  # group 3: fp8 plain cast (ComfyUI-style)
    errs = quantise_(unet, None)
    run("fp8 e4m3 plain cast", unet, errs, lambda: weight_bytes(unet.half()))
    del unet

    print(f"\nSDXL base UNet (random weights, seed {args.seed}, {n_params / 1e9:.3f} B params), latent {h}x{w}, "
          f"batch {b} (t = {', '.join(f'{t:.0f}' for t in inputs[1].tolist())}), CPU, fp32 compute, "
          f"{args.threads} threads\n")
    print("| weights | ‖Δ‖/‖ref‖ | max\\|Δ\\|/max\\|ref\\| | per-layer ‖ΔW‖/‖W‖ (median / max) | weight bytes | CPU forward |")
    print("|---|---|---|---|---|---|")
    for label, rel, mx, lw, nb, dt in rows:
        print(f"| {label} | {rel:.4f} | {mx:.4f} | {lw} | {nb / GB:.2f} GB | {dt:.1f} s |")
    print(f"\ncommand: flock /tmp/df-bigmem.lock python benchmarks/fp8.py --latent {args.latent} --batch {b} "
          f"--threads {args.threads} --seed {args.seed}")


if __name__ == "__main__":
    main()
