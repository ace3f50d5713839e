"""VAE decode cost: full vs tiled (ours) vs reference-style tiled (PRIS-CV DemoFusion).

    python benchmarks/vae.py --config tiny --sizes 1024 2048
    flock /tmp/df-bigmem.lock python benchmarks/vae.py --config sdxl --sizes 1024 2048 --estimate-tiled

Random weights (seeded). Tiling uses SDXL's settings for both configs: ours with tiles of at
most 128 latents overlapping by >= 32 (1024 px tiles, the defaults for SDXL), the reference with the UNet
sample size 128 (32-latent cores, 48 latents of context: 1024 px windows). Each (size, mode)
runs in a fresh subprocess; peak memory is the peak RSS above the RSS before the call (CPU,
polled every 2 ms) or ``torch.cuda.max_memory_allocated`` above the weights (GPU).
``--estimate-tiled`` times only ``--tiles`` tile decodes per tiled mode and scales by the tile
count (marked "est."), for the full-size VAE on a CPU where the reference takes ~0.5 h at 2048².
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time

import torch

from demofusion.vae import AutoencoderKL, VAEConfig, decode_tiled, decode_tiled_reference
from demofusion.vae.tiled import redundancy, reference_views, tile_layout
from demofusion.weights import parse_dtype

TILE, OVERLAP, UNET_SAMPLE = 128, 32, 128


class PeakRSS:
    """Peak resident memory above the level at entry (polled in a thread)."""

    def __enter__(self):
        import psutil

        self.proc, self.stop = psutil.Process(), False
        self.base = self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.base


def build(config: str, dtype, device) -> AutoencoderKL:
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.preset(config))
    sd = {}
    for k, p in vae.state_dict().items():  # N(0, 1/fan_in) weights, unit norm gains, small biases
        r = torch.randn(p.shape, generator=g)
        sd[k] = r / math.sqrt(p[0].numel()) if p.ndim > 1 else (1 + 0.1 * r if k.endswith("weight") else 0.1 * r)
    vae.load_state_dict(sd, assign=True)
    return vae.to(device, dtype).eval().requires_grad_(False)


def one(args) -> dict:
    """Time and measure one (size, mode) in this process."""
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dev, dtype = torch.device(args.device), parse_dtype(args.dtype)
    vae = build(args.config, dtype, dev)
    lat = args.size // 8
    z = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    t_side, starts = tile_layout(lat, TILE, OVERLAP)
    n_tiles = {"full": 1, "tiled": len(starts) ** 2,
               "reference": len(reference_views(lat, lat, UNET_SAMPLE // 4, UNET_SAMPLE // 4))}[args.mode]
    estimate = args.estimate_tiled and args.mode != "full" and n_tiles > args.tiles
    if estimate:  # decode `tiles` single tiles of the mode's tile size; scale by the count
        side = t_side if args.mode == "tiled" else UNET_SAMPLE
        zt = z[:, :, :side, :side] if args.mode == "tiled" else torch.randn(1, 4, side, side).to(dev, dtype)
        fn, reps = (lambda: vae.decode(zt)), args.tiles
    elif args.mode == "full":
        fn, reps = (lambda: vae.decode(z)), 1
    elif args.mode == "tiled":
        fn, reps = (lambda: decode_tiled(vae, z, TILE, OVERLAP, batch_size=args.batch)), 1
    else:
        fn, reps = (lambda: decode_tiled_reference(vae, z, UNET_SAMPLE)), 1
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        fn()  # warm-up (kernels, cuDNN autotune)
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else mem.delta
    if estimate:
        secs = secs / reps * n_tiles
    red = {"full": 1.0, "tiled": redundancy(lat, lat, TILE, OVERLAP),
           "reference": n_tiles * UNET_SAMPLE ** 2 / lat ** 2}[args.mode]
    return {"size": args.size, "mode": args.mode, "seconds": secs, "peak_bytes": peak, "tiles": n_tiles,
            "redundancy": red, "estimated": bool(estimate)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sdxl"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--modes", nargs="+", default=["full", "tiled", "reference"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="tiles per decode call (ours)")
    ap.add_argument("--estimate-tiled", action="store_true")
    ap.add_argument("--tiles", type=int, default=2, help="tiles timed per tiled mode with --estimate-tiled")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    print(f"VAE decode, config={args.config}, {args.device} {args.dtype}, {args.threads} threads")
    print(f"{'size':>6} {'mode':>10} {'tiles':>6} {'redund.':>8} {'time':>12} {'peak mem':>10}")
    passthrough = ["--config", args.config, "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads), "--batch", str(args.batch), "--tiles", str(args.tiles)]
    if args.estimate_tiled:
        passthrough.append("--estimate-tiled")
    for size in args.sizes:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", "--size", str(size), "--mode", mode, *passthrough]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            est = " (est.)" if r["estimated"] else ""
            print(f"{size:>6} {mode:>10} {r['tiles']:>6} {r['redundancy']:>8.2f} {r['seconds']:>7.1f} s{est:<6}"
                  f" {r['peak_bytes'] / 2**20:>7.0f} MB{' (est.: one tile)' if est else ''}", flush=True)


if __name__ == "__main__":
    main()
