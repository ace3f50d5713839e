"""DemoFusion as one multi-view denoiser D(z, i): the sampler steps the whole latent once
per step on the fused prediction, so a sampler with a history works — the same latents for every
view batch and on several ranks — and a researcher's view layout is what the run, the work line
and the memory planner all count."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch

from demofusion.cli.common import report_work
from demofusion.pipeline import DemoFusionPipeline, Mechanisms, view_layout
from tests.helpers import max_rel_err
from tests.helpers.pipeline import small_pipeline

HELPERS = Path(__file__).parents[1] / "helpers"
RUN = dict(prompt="a castle", height=384, width=256, num_inference_steps=3, seed=5, stride=8,
           output_type="latent")  # 3 phases of the 128-px tiny UNet


class AdamsBashforth2:
    """A multistep sampler stand-in: 2-step Adams–Bashforth on ε over the wrapped Euler sampler's σ
    steps, ε̃_i = 3/2·ε_i − 1/2·ε_{i−1} (ε̃_0 = ε_0), the history restarting with each phase. It keeps
    the previous ε between calls: stepped chunk by chunk (views or ranks), it would mix histories."""

    def __init__(self, euler):
        self.euler, self.previous = euler, None

    def __getattr__(self, name):  # set_timesteps, timesteps(_cpu), init_sigma, scale_model_input_at, …
        return getattr(self.euler, name)

    def step_at(self, eps, i, sample, noise=None):
        if i == 0:
            self.previous = None
        e = eps if self.previous is None else 1.5 * eps - 0.5 * self.previous
        self.previous = eps
        return self.euler.step_at(e, i, sample, noise=noise)


def multistep(pipe) -> DemoFusionPipeline:
    return DemoFusionPipeline(pipe.unet, pipe.vae, pipe.text, AdamsBashforth2(pipe.scheduler))


def test_a_multistep_sampler_gives_the_same_latents_for_every_view_batch():
    base = small_pipeline("sdxl")
    pipe = multistep(base)
    ref = pipe(view_batch_size=1, **RUN).latents
    assert len(ref) == 3
    for vbs in (3, 16):
        got = pipe(view_batch_size=vbs, **RUN).latents
        assert max(max_rel_err(a, b) for a, b in zip(got, ref)) <= 1e-5, vbs
    # the history is really used: plain Euler differs
    euler = base(view_batch_size=16, **RUN).latents
    assert max_rel_err(euler[-1], ref[-1]) > 1e-3


def test_a_multistep_sampler_on_two_gloo_ranks_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, HELPERS / "dist_api.py", "ab2", tmp_path / "one", "2"], check=True, env=env,
                   capture_output=True, timeout=300)  # one process split as 2 ranks split (view_ranks=2)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(HELPERS / "dist_api.py"), "ab2", str(tmp_path / "two")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = torch.load(tmp_path / "one" / "one2.pt")
    assert len(ref["latents"]) == 3
    for rank in range(2):
        got = torch.load(tmp_path / "two" / f"rank{rank}.pt")
        assert got["unet_calls"] == ref["unet_calls"]
        assert all(torch.equal(a, b) for a, b in zip(got["latents"], ref["latents"])), rank


def no_overlap(s, k):
    """A researcher's layout: local windows at stride = window (no overlap)."""
    return view_layout(dataclasses.replace(s, stride=s.window), k)


def test_a_swapped_view_layout_is_what_the_run_the_work_line_and_the_planner_count(capsys):
    base = small_pipeline("sdxl")
    pipe = DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler,
                              mechanisms=Mechanisms(view_layout=no_overlap))
    kw = dict(height=384, width=256, num_inference_steps=1, view_batch_size=1)
    window = base.unet.config.sample_size  # 16 latents
    s = pipe.validate("a castle", **kw)
    want = base.validate("a castle", **kw, stride=window).unet_evaluations()
    assert s.unet_evaluations(pipe.mechanisms.view_layout) == want != s.unet_evaluations()
    report_work(s, "cpu", "tiny", pipe.mechanisms.view_layout)
    assert f"({', '.join(f'{e:,}' for e in want)})" in capsys.readouterr().out
    # the denoiser cuts those views: one UNet call (CFG pair) per view and step at view_batch_size 1
    out = pipe("a castle", seed=1, output_type="latent", **kw)
    assert [2 * n for n in out.unet_calls] == want
    # the planner budgets them: the same stages as the overlap-free stride, not the default's
    stages = lambda p, **x: [(st.detail, st.latents) for st in p.memory_plan(prompt="a castle", **kw, **x).stages
                             if st.name == "unet"]
    assert stages(pipe) == stages(base, stride=window) != stages(base)
