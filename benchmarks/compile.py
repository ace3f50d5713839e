"""torch.compile of the UNet vs eager, one process, tiny preset (or any --model).

    python benchmarks/compile.py --dynamic auto          # torch's default: batch dim dynamic after a recompile
    python benchmarks/compile.py --dynamic false         # one static graph per input shape

Prints eager and compiled seconds per run (twice each) and per phase, and the compile time.
"""

import argparse
import time

import torch

import demofusion as df


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    pipe = df.DemoFusionPipeline.from_pretrained(a.model, device=a.device)
    job = dict(prompt="a cat", height=a.size, width=a.size, num_inference_steps=a.steps, seed=0,
               stride=a.stride, output_type="latent")

    def timed():
        t = time.perf_counter()
        out = pipe(**job)
        return f"{time.perf_counter() - t:.2f} s (phases {', '.join(f'{x:.2f}' for x in out.timings)})"

    print(f"{a.model} {a.size}² {a.steps} steps, device {a.device}, torch {torch.__version__}")
    print("eager:   ", timed(), "|", timed())
    pipe.compile(mode=a.mode, dynamic={"auto": None, "true": True, "false": False}[a.dynamic])
    t = time.perf_counter()
    pipe(**job)
    print(f"compile (first run): {time.perf_counter() - t:.1f} s, dynamic={a.dynamic}")
    print("compiled:", timed(), "|", timed())


if __name__ == "__main__":
    main()
