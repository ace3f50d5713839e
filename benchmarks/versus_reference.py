"""Ours against the PRIS-CV reference pipeline on the CPU proxy: denoising time, same settings.

    python benchmarks/pipeline.py --reference /path/to/pipeline_demofusion_sdxl.py
    python benchmarks/versus_reference.py /path/to/pipeline_demofusion_sdxl.py --size 768 --steps 10 --repeats 5

The reference file lives outside this repository (docs/parity.md says how to fetch it); it is
imported as-is by tests/helpers/reference.py, which also builds the diffusers components. Both
pipelines load the same seeded random weights from one diffusers folder — the ``tiny`` preset's
shapes (256-px base, so 768² is three phases) — and run the same job: same prompt, steps, CFG,
stride, view batch, noise, no view jitter (the reference's ``random`` is stubbed to 0; ours
``view_jitter=False``), one process, fp32, runs alternating ours/reference so load on the machine
hits both alike.

Denoising time = whole call − text encoding − VAE decoding, each timed by forward hooks on the
modules (text encoders; the VAE's ``post_quant_conv`` and ``decoder``), so the two pipelines'
very different decoders (tiled reference-style vs ours) do not enter the ratio. ``UNet`` is the
time inside the UNet's forward; ``rest`` = denoising − UNet is the algorithm's own overhead
(views, merges, scheduler, skip residual, dilated sampling).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers (the reference's runtime)

from tests.helpers.reference import (  # noqa: E402
    build_reference_pipeline, load_reference, run_reference, save_folder, tiny_components)


CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (this process's CPU seconds; robust to other load)


class Stopwatch:
    """Seconds spent inside the forwards of some modules (pre/post hooks; nested calls not double-counted)."""

    def __init__(self, modules):
        self.seconds, self.samples, self._depth, self._t0 = 0.0, 0, 0, 0.0
        self._hooks = [h for m in modules for h in (m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post))]

    def _pre(self, module, args):
        if self._depth == 0:
            self._t0 = CLOCK[0]()
            self.samples += args[0].shape[0] if args and torch.is_tensor(args[0]) else 0
        self._depth += 1

    def _post(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += CLOCK[0]() - self._t0

    def take(self) -> float:
        s, self.seconds, self.samples = self.seconds, 0.0, 0
        return s


def watches(unet, vae, text_encoders) -> dict:
    return dict(unet=Stopwatch([unet]), decode=Stopwatch([vae.post_quant_conv, vae.decoder]), text=Stopwatch(text_encoders))


def timed(run, w) -> dict:
    for s in w.values():
        s.take()
    t0 = CLOCK[0]()
    run()
    total = CLOCK[0]() - t0
    evaluations = w["unet"].samples  # single-sample UNet evaluations: both must do the same work
    got = {k: s.take() for k, s in w.items()}
    denoise = total - got["decode"] - got["text"]
    return dict(total=total, denoise=denoise, unet=got["unet"], rest=denoise - got["unet"], decode=got["decode"],
                evaluations=evaluations)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", help="path to the reference's pipeline_demofusion_sdxl.py")
    ap.add_argument("--size", type=int, default=768, help="square output side in px (tiny base 256: 768 = 3 phases)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--stride", type=int, default=16, help="latent px between windows (window 32 latent px)")
    ap.add_argument("--view-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: count this process's CPU seconds (with --threads 1, robust to other jobs on the machine)")
    a = ap.parse_args(argv)
    CLOCK[0] = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)

    import demofusion as df

    with tempfile.TemporaryDirectory() as tmp:
        comps = tiny_components(preset=True)
        save_folder(comps, tmp)
        mod = load_reference(a.reference)
        ref = build_reference_pipeline(mod, comps, tmp)
        ours = df.DemoFusionPipeline.from_pretrained(tmp, device="cpu", dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        n = a.size // 256
        lat = torch.randn(1, 4, a.size // n // 8, a.size // n // 8, generator=g)
        ups = [torch.randn(1, 4, a.size * s // n // 8, a.size * s // n // 8, generator=g) for s in range(2, n + 1)]
        job = dict(prompt="a lighthouse at dawn", height=a.size, width=a.size, num_inference_steps=a.steps,
                   guidance_scale=a.guidance, stride=a.stride, view_batch_size=a.view_batch_size,
                   cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0, sigma=0.8, multi_decoder=True)

        def run_ref():
            run_reference(mod, ref, latents=lat, upscale_noise=ups, **job)

        def run_ours():
            ours(latents=lat.clone(), upscale_noise=[u.clone() for u in ups], view_jitter=False, **job)

        w_ref = watches(ref.unet, ref.vae, [ref.text_encoder, ref.text_encoder_2])
        w_ours = watches(ours.unet, ours.vae, [ours.text.text_encoder, ours.text.text_encoder_2])
        run_ref(), run_ours()  # warm-up: first-call allocations and lazy imports
        rows = {"reference": [], "ours": []}
        for _ in range(a.repeats):
            rows["reference"].append(timed(run_ref, w_ref))
            rows["ours"].append(timed(run_ours, w_ours))

    med = {who: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for who, runs in rows.items()}
    print(f"tiny preset shapes, fp32 CPU, {torch.get_num_threads()} threads, {a.size}² px ({n} phases), {a.steps} steps, "
          f"CFG {a.guidance}, stride {a.stride}, view_batch_size {a.view_batch_size}, no jitter; "
          f"median of {a.repeats} alternating runs after one warm-up, {a.clock} seconds")
    print("| pipeline | UNet evaluations | denoising | UNet | rest of denoising | decoding | whole call |")
    print("|---|---|---|---|---|---|---|")
    for who, m in med.items():
        print(f"| {who} | {m['evaluations']:.0f} | {m['denoise']:.3f} | {m['unet']:.3f} | {m['rest']:.3f} | {m['decode']:.3f} "
              f"| {m['total']:.3f} |")
    ratios = [o["denoise"] / r["denoise"] for o, r in zip(rows["ours"], rows["reference"])]
    print(f"denoising ours/reference: {med['ours']['denoise'] / med['reference']['denoise']:.3f} "
          f"(per pair: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
