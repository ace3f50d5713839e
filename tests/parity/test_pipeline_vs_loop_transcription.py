"""Step parity: the pipeline's per-step latents equal a loop transcription of docs/algorithm.md.

Jitter off, identical noise (the transcription draws it in the pipeline's documented order),
fp32, tiny components with a 16-latent window, 3 phases. Tolerance: max|Δ| ≤ 1e-5·max|ref|
at every step of every phase.
"""

import pytest
import torch

from tests.helpers import max_rel_err
from tests.helpers.pipeline import record_steps, small_pipeline, transcription

CASES = [
    # kind, height, width, guidance, steps
    ("sdxl", 384, 384, 7.5, 3),  # square, Euler, CFG
    ("sdxl", 192, 384, 7.5, 2),  # 1:2, Euler, CFG
    ("turbo", 384, 384, 0.0, 2),  # square, Euler-ancestral, no guidance
    ("turbo", 384, 192, 0.0, 2),  # 2:1, Euler-ancestral
]


@pytest.mark.parametrize("kind,height,width,guidance,steps", CASES)
def test_per_step_latents_equal_loop_transcription(kind, height, width, guidance, steps):
    pipe = small_pipeline(kind)
    kw = dict(prompt="a red fox", height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
              seed=3, stride=8, view_jitter=False, output_type="latent", view_batch_size=5)
    out, ours = record_steps(pipe, **kw)
    ref = transcription(pipe, "a red fox", height, width, steps, guidance, seed=3, stride=8)
    assert sorted(ours) == sorted(ref)
    assert {k[0] for k in ref} == {1, 2, 3}, "3 phases expected"
    worst = max(max_rel_err(ours[k], ref[k]) for k in ref)
    assert worst <= 1e-5, f"max rel err {worst:.2e}"
    assert out.latents[-1].shape[-2:] == (height // 8, width // 8)
