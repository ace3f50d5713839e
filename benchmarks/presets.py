"""The work of every run preset against the paper's default: counted single-view UNet evaluations
and FLOPs at 2048², 3072², 4096² (SDXL base size 1024, guidance as each preset sets it), and with
``--wall`` the CPU wall time of a tiny run per preset (random weights; shows the relative cost of
the samplers' steps, not a GPU figure).

    python benchmarks/presets.py                 # the table (counting only: seconds)
    python benchmarks/presets.py --wall          # + tiny-model wall time per preset (minutes on 2 cores)

Counted with the pipeline's own bookkeeping (``Settings.unet_evaluations``: the views of every
phase × the steps it runs × 2 with guidance); FLOPs = evaluations × 6.76e12, one SDXL UNet forward
of a 128² latent at batch 1 (docs/benchmarks.md, "Facts the counts use").
"""

from __future__ import annotations

import argparse
import time

from demofusion.pipeline.settings import validate
from demofusion.run_presets import PRESETS

FLOPS_128 = 6.76e12  # one SDXL UNet forward, 128² latent, batch 1 (docs/benchmarks.md)
SIZES = (2048, 3072, 4096)


def evaluations(size: int, preset: str | None) -> int:
    s = validate(1024, prompt="a lighthouse", height=size, width=size, preset=preset)
    return sum(s.unet_evaluations())


def table() -> list[str]:
    rows = ["| preset | " + " | ".join(f"{n}² evaluations (FLOPs)" for n in SIZES) + f" | fewer than the paper at {SIZES[-1]}² |",
            "|---|" + "---|" * (len(SIZES) + 1)]
    paper = {n: evaluations(n, None) for n in SIZES}
    for name in (None, *PRESETS):
        ev = {n: evaluations(n, name) for n in SIZES}
        cells = " | ".join(f"{ev[n]:,} ({ev[n] * FLOPS_128:.2e})" for n in SIZES)
        rows.append(f"| {name or 'paper (50 steps, CFG 7.5)'} | {cells} | {paper[SIZES[-1]] / ev[SIZES[-1]]:.1f}× |")
    return rows


def wall(size: int = 512, steps: int | None = None) -> list[str]:
    from demofusion import DemoFusionPipeline

    pipe = DemoFusionPipeline.from_pretrained("tiny")
    rows = ["| preset | tiny run, s |", "|---|---|"]
    for name in (None, *PRESETS):
        t = time.perf_counter()
        pipe("a lighthouse", height=size, width=size, seed=0, preset=name, output_type="latent", progress=False)
        rows.append(f"| {name or 'paper'} | {time.perf_counter() - t:.1f} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wall", action="store_true", help="also time a tiny-model run per preset on this machine")
    args = ap.parse_args()
    print("\n".join(table()))
    if args.wall:
        print()
        print("\n".join(wall()))


if __name__ == "__main__":
    main()
