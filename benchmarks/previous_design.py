"""Default-mode latents of this tree against another checkout (the previous, step-every-view
design) on the tiny preset: 3 phases, Euler, DDIM (clip_sample off: SDXL's config) and
Euler-ancestral, with the same starting noise and upscale noise given and the same seed (so the
same per-step noise canvases). Prints the max relative difference per sampler and phase.

    python benchmarks/previous_design.py --previous /path/to/other/checkout

Each side runs in its own process with its own ``PYTHONPATH`` (this tree / ``--previous``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = ("euler", "ddim", "euler-a")
RUN = dict(prompt="a lighthouse on a cliff", height=768, width=576, num_inference_steps=4, seed=3, stride=16,
           guidance_scale=7.5, output_type="latent")  # tiny preset: base 256 px → 3 phases


def run(out: str) -> None:
    """One side: every sampler's per-phase latents, saved to ``out``."""
    from demofusion import DemoFusionPipeline
    from demofusion.schedulers import from_config

    pipe = DemoFusionPipeline.from_pretrained("tiny", device="cpu")
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(1, 4, 32, 24, generator=g)  # phase 1: 256×192 px
    noise = [torch.randn(1, 4, 64, 48, generator=g), torch.randn(1, 4, 96, 72, generator=g)]
    result = {}
    for name in SAMPLERS:
        cls = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}
        extra = {"clip_sample": False} if name == "ddim" else {}
        pipe.scheduler = from_config(dict(pipe.scheduler.config), _class_name=cls[name], **extra)
        result[name] = pipe(latents=z1, upscale_noise=noise, **RUN).latents
    torch.save(result, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--previous", required=True, help="a checkout of the previous design")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        return run(a.side)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for label, root in (("this", ROOT), ("previous", Path(a.previous))):
            files[label] = os.path.join(tmp, f"{label}.pt")
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, __file__, "--previous", a.previous, "--side", files[label]], check=True,
                           env=env, cwd=root)
        ours, prev = (torch.load(files[k]) for k in ("this", "previous"))
    worst = 0.0
    for name in SAMPLERS:
        errs = [((x - y).abs().max() / y.abs().max()).item() for x, y in zip(ours[name], prev[name])]
        worst = max(worst, *errs)
        print(f"{name:8s} max relative difference per phase: " + ", ".join(f"{e:.1e}" for e in errs))
    print(f"worst: {worst:.1e}")


if __name__ == "__main__":
    main()
