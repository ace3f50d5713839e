"""Pieces the benchmark scripts share (imported as a sibling, like docsection): a per-call timer,
and the SDXL UNet benchmarks' command-line flags and inputs."""

import time

import torch


def seconds_per_call(fn, calls: int, sync=lambda: None, warmup: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``calls`` calls after ``warmup`` untimed ones; ``sync``
    (e.g. ``torch.cuda.synchronize``) before each clock read, so queued device work counts."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def add_unet_flags(ap) -> None:
    """--latent HxW, --batch and --threads, as every UNet benchmark takes them."""
    ap.add_argument("--latent", default="32x32", help="latent HxW (8 px per latent)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)


def parse_unet_flags(ap):
    """(args, latent height, latent width), with torch's CPU threads set from --threads."""
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = map(int, args.latent.lower().split("x"))
    return args, h, w


def unet_inputs(batch: int, h: int, w: int, device="cpu", dtype=torch.float32) -> tuple:
    """An SDXL UNet call's inputs for ``batch`` latents of h×w, seeded (1): latents, timesteps 999 … 1,
    text embeddings [B, 77, 2048], pooled [B, 1280], micro-conditioning ids (float32)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, h, w, generator=g).to(device, dtype)
    t = torch.linspace(999, 1, batch).to(device)
    ctx = torch.randn(batch, 77, 2048, generator=g).to(device, dtype)
    pooled = torch.randn(batch, 1280, generator=g).to(device, dtype)
    ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, dtype=torch.float32, device=device)
    return x, t, ctx, pooled, ids
