"""The samplers inside the pipeline against diffusers and the whole-latent loop transcription.

* Phase 1 alone (a run at the model's base size: plain SDXL) with dpm++2m Karras, unipc, heun and
  lcm equals diffusers' ``StableDiffusionXLPipeline`` with that scheduler, built from the same
  config, on the same tiny weights and starting noise (lcm: the same per-step noise), every
  evaluation's latents ≤ 1e-4.
* Three DemoFusion phases with dpm++2m, unipc and heun equal the whole-latent loop transcription
  (``tests/helpers/pipeline.py``, ``whole_latent=True``: the views' predictions merged and fused,
  diffusers' scheduler stepping the whole latent, restarted every phase) ≤ 1e-5 at every step, at
  view_batch_size 1 and 16; on 2 gloo ranks (dpm++2m, unipc) every phase's latents equal the
  one-process run's ≤ 1e-5 (the thread count changes float rounding, so not bit for bit here).

UniPC under the skip residual (docs/components.md): its corrector moves the latent it is given by
the correction it makes to its own prediction, so the residual's change is kept; the transcription
gives diffusers' UniPC that rule (``keep_caller_changes``), and without it the runs differ.
Heun needs no rule: its corrector evaluation sees the residual like every evaluation, and its
result is built from the step's start, which carried the residual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demofusion as df
from demofusion.schedulers import SDXL_BASE_CONFIG
from tests.helpers import max_rel_err
from tests.helpers import reference as R
from tests.helpers.pipeline import record_steps, small_pipeline, transcription

SDXL_TOL = 1e-4  # max|Δ| / max|ref| of the latents after every evaluation, ours vs diffusers' pipeline
LOOP_TOL = 1e-5  # the same against the loop transcription (and 2 ranks against one process)
HELPERS = Path(__file__).parents[1] / "helpers"


def diffusers_scheduler(name: str, config):
    """diffusers' scheduler for our sampler ``name`` (with its σ schedule), from ``config``."""
    import diffusers as D

    cls, extra = {"dpm++2m karras": (D.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
                  "dpm++2m": (D.DPMSolverMultistepScheduler, {}), "unipc": (D.UniPCMultistepScheduler, {}),
                  "heun": (D.HeunDiscreteScheduler, {}), "lcm": (D.LCMScheduler, {})}[name]
    return cls.from_config(config, **extra)


def use(pipe, name: str):
    """Our pipeline on sampler ``name`` (a trailing "karras" is the σ schedule, as A1111 writes it)."""
    return pipe.set_scheduler(name)


# ---- phase 1 equals diffusers' StableDiffusionXLPipeline ------------------------------
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(ours, diffusers') pipelines on the tiny reference components, saved and read back by ours."""
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    comps = R.tiny_components(seed=0)
    R.save_folder(comps, folder)
    ours = df.DemoFusionPipeline.from_pretrained(str(folder), device="cpu", dtype=torch.float32)
    tok1, tok2 = R.hf_tokenizers(folder)
    ref = StableDiffusionXLPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"],
                                    text_encoder_2=comps["text_encoder_2"], tokenizer=tok1, tokenizer_2=tok2,
                                    unet=comps["unet"], scheduler=comps["scheduler"], add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ours, ref, comps["scheduler"].config  # the folder's scheduler config, as ours read it


def phase_generator(seed: int) -> torch.Generator:
    """Phase 1's generator as the pipeline documents it: the first 62-bit sub-seed of the root seed."""
    sub = torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(seed))
    return torch.Generator().manual_seed(int(sub[0]))


@pytest.mark.parametrize("name", ["dpm++2m karras", "unipc", "heun", "lcm"])
def test_phase_one_equals_diffusers_sdxl_pipeline(sdxl, name):
    ours, ref, config = sdxl
    base, steps, seed = ours.base_size, 5, 7
    latents = torch.randn(1, 4, base // 8, base // 8, generator=torch.Generator().manual_seed(1))
    run = dict(prompt="a red fox", height=base, width=base, num_inference_steps=steps, guidance_scale=7.5)
    out, got = record_steps(use(ours, name), seed=seed, latents=latents, output_type="latent", **run)
    assert len(out.latents) == 1  # one phase: plain SDXL

    ref.scheduler = diffusers_scheduler(name, config)
    want = []
    ref(**run, latents=latents.clone(), generator=phase_generator(seed), output_type="latent",
        callback_on_step_end=lambda p, i, t, kw: (want.append(kw["latents"].clone()), {})[1])
    assert len(got) == len(want) == (2 * steps - 1 if name == "heun" else steps)
    errs = [max_rel_err(got[(1, i)], w) for i, w in enumerate(want)]
    assert max(errs) <= SDXL_TOL, f"{name}: per-evaluation max|Δ|/max|ref| {['%.1e' % e for e in errs]}"


# ---- three DemoFusion phases equal the whole-latent loop transcription ---------------
RUN = dict(prompt="a castle", height=384, width=256, num_inference_steps=3, guidance_scale=0.0, seed=5,
           stride=8)  # 3 phases of the 128-px tiny UNet; no guidance (it acts before the sampler: phase 1 tests it)


@pytest.fixture(scope="module")
def tiny():
    return small_pipeline("sdxl")


def keep_caller_changes(sched):
    """diffusers' UniPC with our documented rule: the corrector moves the sample it is given by the
    correction x_c − x_p (x_p: what the previous step returned), keeping a change made in between."""
    step, correct, last = sched.step, sched.multistep_uni_c_bh_update, {}

    def corrected(*args, this_sample, **kw):
        return correct(*args, this_sample=this_sample, **kw) + (this_sample - last["out"])

    def stepped(*args, **kw):
        out = step(*args, **kw)
        last["out"] = out[0]
        return out

    sched.multistep_uni_c_bh_update, sched.step = corrected, stepped
    return sched


def loop(pipe, name: str, rule: bool = True) -> dict:
    """The transcription's per-step latents with diffusers' ``name`` stepping the whole latent."""
    sched = diffusers_scheduler(name, SDXL_BASE_CONFIG)
    if name == "unipc" and rule:
        sched = keep_caller_changes(sched)
    kw = {k: v for k, v in RUN.items() if k not in ("num_inference_steps", "guidance_scale")}
    return transcription(pipe, steps=RUN["num_inference_steps"], guidance=RUN["guidance_scale"], scheduler=sched,
                         whole_latent=True, **kw)


def step_errors(got: dict, want: dict) -> dict:
    """Per phase, the largest max|Δ|/max|ref| over its steps."""
    assert got.keys() == want.keys()
    out = {}
    for (phase, i), w in want.items():
        out[phase] = max(out.get(phase, 0.0), max_rel_err(got[(phase, i)], w))
    return out


@pytest.fixture(scope="module")
def ones(tiny):
    """name → (the transcription, our one-process run at view_batch_size 16)."""
    cache = {}

    def get(name):
        if name not in cache:
            out, steps = record_steps(use(tiny, name), view_batch_size=16, view_jitter=False, output_type="latent",
                                      **RUN)
            cache[name] = (loop(tiny, name), steps, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["dpm++2m", "unipc", "heun"])
def test_three_phases_equal_the_whole_latent_loop(tiny, ones, name):
    want, got, out = ones(name)
    assert len(out.latents) == 3
    errs = step_errors(got, want)
    assert max(errs.values()) <= LOOP_TOL, f"{name}, view_batch_size 16: {errs}"
    if name != "heun":  # view_batch_size 1: one view per UNet call, the same history
        _, single = record_steps(use(tiny, name), view_batch_size=1, view_jitter=False, output_type="latent", **RUN)
        errs = step_errors(single, want)
        assert max(errs.values()) <= LOOP_TOL, f"{name}, view_batch_size 1: {errs}"


def test_unipc_keeps_the_skip_residual_through_its_corrector(tiny, ones):
    """Without the rule (diffusers' corrector as is, which rebuilds the sample from the previous
    one) the upscaling phases differ: the rule is what the package does, not a no-op."""
    _, got, _ = ones("unipc")
    errs = step_errors(got, loop(tiny, "unipc", rule=False))
    assert errs[1] <= LOOP_TOL and errs[2] > 1e-3 and errs[3] > 1e-3, errs


def test_multistep_samplers_on_two_gloo_ranks_equal_one_process(ones, tmp_path):
    names = ["dpm++2m", "unipc"]
    call = {k: v for k, v in RUN.items() if k != "prompt"} | dict(view_batch_size=3, view_jitter=False,
                                                                  output_type="latent")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(HELPERS / "dist_api.py"), ",".join(names), str(tmp_path), json.dumps(call)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in names:
        ref = ones(name)[2]
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}.rank{rank}.pt")
            errs = [max_rel_err(a, b) for a, b in zip(got["latents"], ref.latents)]
            assert len(errs) == 3 and max(errs) <= LOOP_TOL, (name, rank, errs)
