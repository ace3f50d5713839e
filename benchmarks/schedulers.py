"""Per-call cost of scheduler.step (ours vs diffusers) on one SDXL-sized latent view.

    python benchmarks/schedulers.py [--device cpu] [--size 128] [--calls 200]

DemoFusion calls step once per view (hundreds of times per denoising step at 4096²), so the
per-call overhead (timestep lookup, scalar maths) matters more than the arithmetic.
"""

import argparse
import warnings

import torch

from shared import seconds_per_call

import demofusion.schedulers as S


def per_call_us(fn, calls, sync):
    return seconds_per_call(fn, calls, sync, warmup=5) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(1, 4, a.size, a.size, device=dev)
    out = torch.randn_like(x)
    z = torch.randn_like(x)
    try:
        import diffusers
    except ImportError:
        diffusers = None
    warnings.filterwarnings("ignore")
    print(f"device={dev} latent=1x4x{a.size}x{a.size} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name in ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        ours = S.SCHEDULERS[name].from_config(S.SDXL_BASE_CONFIG)
        ours.set_timesteps(50, device=dev)
        t = ours.timesteps[10]
        kw = {"noise": z} if "Ancestral" in name else {}
        row = f"{name:34s} ours {per_call_us(lambda: ours.step(out, t, x, **kw), a.calls, sync):8.1f} µs"
        if diffusers is not None:
            ref = getattr(diffusers, name).from_config(S.SDXL_BASE_CONFIG)
            ref.set_timesteps(50, device=dev)
            tr = ref.timesteps[10]
            ref.is_scale_input_called = True  # silence its per-call warning

            def ref_step():
                if hasattr(ref, "_step_index"):
                    ref._step_index = None  # per-view use: diffusers must re-find its index each call
                return ref.step(out, tr, x).prev_sample

            row += f"   diffusers {per_call_us(ref_step, a.calls, sync):8.1f} µs"
        print(row)


if __name__ == "__main__":
    main()
