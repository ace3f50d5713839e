"""Same seed, same bits on a GPU: the CUDA determinism guard, the deterministic view
merge, and whole runs on fake CUDA (tests/helpers/determinism.py; fake CUDA: tests/pipeline/test_fake_cuda.py).

What each whole-run test asserts is written in its name and docstring: no CUDA-nondeterministic
op in a whole run, and no blocking host→device copy in a step (the phase's random numbers drawn
on the host in the documented order, ahead, and copied from pinned memory: pipeline/draws.py),
with a deterministic and a stochastic sampler, under ``torch.use_deterministic_algorithms(True)``.
One upscaling step traces as one graph (``torch._dynamo.explain``).
"""

import dataclasses


import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from demofusion.ops import gather_views, jitter_range, jitter_views, local_views, scatter_add_views
from demofusion.ops.views import _flat_index
from demofusion.presets import random_components
from demofusion.pipeline import DemoFusionPipeline, Mechanisms
from demofusion.pipeline import algorithm as A
from demofusion.pipeline.denoise import Conditioning, GuidedUNet
from demofusion.pipeline.draws import PhaseDraws
from demofusion.pipeline.settings import validate
from demofusion.schedulers import EulerAncestralDiscreteScheduler, SDXL_TURBO_CONFIG, from_config
from tests.helpers.determinism import CudaGuard, NondeterministicOp
from tests.helpers.pipeline import small_pipeline


def _mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


# ---- the guard itself ----------------------------------------------------------------------------
def test_guard_fails_on_cuda_accumulations_and_not_on_cpu():
    with _mode():
        z = torch.zeros(4, 3, device="cuda")
        idx = torch.zeros(5, dtype=torch.long, device="cuda")  # duplicates: atomics in no fixed order
        src = torch.ones(5, 3, device="cuda")
        for op in (lambda: z.index_add_(0, idx, src),
                   lambda: z.index_put_((idx,), src, accumulate=True),
                   lambda: z.scatter_add_(0, idx[:, None].expand(5, 3), src),
                   lambda: torch.cumsum(src, 0)):
            with CudaGuard(), pytest.raises(NondeterministicOp):
                op()
        with CudaGuard() as guard:  # writes to distinct places are allowed
            z.index_copy_(0, torch.arange(4, device="cuda"), src[:4])
            z.index_put_((torch.arange(4, device="cuda"),), src[:4])
        assert guard.nondeterministic == []
    with CudaGuard() as guard:  # the CPU adds in index order: deterministic
        torch.zeros(4).index_add_(0, torch.zeros(5, dtype=torch.long), torch.ones(5))
    assert guard.nondeterministic == []


def test_guard_records_host_to_device_copies():
    with _mode(), CudaGuard() as guard:
        torch.ones(2, 2).to("cuda")  # pageable, blocking
        torch.ones(3, pin_memory=True).to("cuda", non_blocking=True)  # pinned, non-blocking: fine
        torch.zeros(3, device="cuda").copy_(torch.ones(3))  # pageable copy_
        torch.ones(3, device="cuda") * 2  # a Python scalar is no copy
        torch.ones(3, device="cuda") * torch.tensor(2.0)  # nor a 0-d CPU tensor (passed by value)
        torch.tensor([1, 2], device="cuda")  # built on the host, then copied
        torch.zeros(5, device="cuda")[torch.tensor([0, 2])]  # CPU indices: copied inside the op
        torch.zeros(5, device="cuda").index_put_((torch.tensor(1),), torch.ones((), device="cuda"))  # even 0-d
    assert [(c[1], c[2], c[3]) for c in guard.h2d] == [((2, 2), False, False), ((3,), True, True), ((3,), False, False),
                                                       ((2,), False, False), ((2,), False, False), ((), False, False)]
    assert [c[1] for c in guard.blocking] == [(2, 2), (3,), (2,), (2,), ()]


def _old_merge(views, starts, shape):
    """The merge this replaced: one index_add_ over all views (duplicate indices)."""
    b, c, h, w = shape
    idx = _flat_index(starts, tuple(views.shape[-2:]), w, views.device).reshape(-1)
    vals = views.reshape(starts.shape[0], b, c, -1).permute(1, 2, 0, 3).reshape(b, c, -1)
    return torch.zeros(b, c, h * w, dtype=views.dtype, device=views.device).index_add_(2, idx, vals)


# ---- the view ops on fake CUDA -------------------------------------------------------------------
def test_view_ops_on_fake_cuda_deterministic_and_copy_free():
    """gather → scatter-add with jittered corners made on the device: no nondeterministic op, no
    host→device copy; corners left on the host cost one blocking copy per call (and the previous
    merge fails the guard)."""
    h = w = 96
    win, J = (64, 64), jitter_range(64, 32)
    with _mode():
        z = torch.empty(2, 4, h + 2 * J, w + 2 * J, device="cuda")
        base = local_views(h, w, win, 32)
        on_device = base.to("cuda")  # once per phase, outside the guarded step
        with CudaGuard() as guard:
            starts = jitter_views(on_device, (h, w), win, J)
            views = gather_views(z, starts, win)
            total, count = scatter_add_views(views, starts, tuple(z.shape))
        assert guard.nondeterministic == [] and guard.h2d == []
        assert total.shape == z.shape and count.shape == z.shape[-2:]
        with CudaGuard() as guard:
            scatter_add_views(views, base + J, tuple(z.shape))
        assert len(guard.blocking) == 1  # the host corners' copy
        with CudaGuard(), pytest.raises(NondeterministicOp, match="index_add"):
            _old_merge(views, starts, tuple(z.shape))


# ---- the merge against a loop transcription ------------------------------------------------------
def _loop_merge(views, starts, shape):
    """Σ of views placed at their corners, one slice addition per view in view order; the count."""
    b = shape[0]
    wh, ww = views.shape[-2:]
    total, count = torch.zeros(shape, dtype=views.dtype), torch.zeros(shape[-2:], dtype=views.dtype)
    for k, (y, x) in enumerate(starts.tolist()):
        total[:, :, y : y + wh, x : x + ww] += views[k * b : (k + 1) * b]
        count[y : y + wh, x : x + ww] += 1
    return total, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_is_the_loop_of_slice_additions_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    # (h, w, window, stride): SDXL's half-window stride, a last window shifted back, 4× overlap per axis
    for h, w, win, stride in ((64, 64, 32, 16), (50, 34, 32, 16), (40, 40, 16, 4)):
        starts = local_views(h, w, (win, win), stride)
        J = jitter_range(win, stride)
        starts = jitter_views(starts, (h, w), (win, win), J, g)
        shape = (2, 3, h + 2 * J, w + 2 * J)
        views = torch.randn(len(starts) * 2, 3, win, win, generator=g).to(dtype)
        total, count = scatter_add_views(views, starts, shape)
        want_total, want_count = _loop_merge(views, starts, shape)
        assert total.dtype == dtype and torch.equal(total, want_total) and torch.equal(count, want_count)
        if dtype == torch.float32:  # and the single CPU index_add_ it replaced
            assert torch.equal(total.reshape(2, 3, -1), _old_merge(views, starts, shape))
        idx = _flat_index(starts, (win, win), shape[-1], "cpu").reshape(len(starts), -1)
        assert all(row.unique().numel() == row.numel() for row in idx)  # each write: distinct places


def test_jitter_from_pre_drawn_uniforms_equals_the_generator_draw():
    st = local_views(40, 56, (16, 16), 8)
    J = jitter_range(16, 8)
    drawn = jitter_views(st, (40, 56), (16, 16), J, torch.Generator().manual_seed(5))
    u = torch.rand(st.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(jitter_views(st, (40, 56), (16, 16), J, u=u), drawn)


# ---- whole runs ----------------------------------------------------------------------------------
def test_tiny_run_under_deterministic_algorithms_on_cpu():
    """``torch.use_deterministic_algorithms(True)`` raises on nothing our default path runs, and
    changes no bit (CPU, tiny model, 2 phases with jitter)."""
    pipe = small_pipeline(sample_size=8)
    kw = dict(prompt="a lighthouse", height=128, width=128, num_inference_steps=2, seed=1,
              output_type="latent", view_batch_size=4)
    plain = pipe(**kw).latents
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = pipe(**kw).latents
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(strict) == 2 and all(torch.equal(a, b) for a, b in zip(plain, strict))


def _fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A meta-device module's parameters and buffers swapped for fake fp16 CUDA tensors."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is not None:
                    with mode:
                        f = torch.empty(t.shape, dtype=torch.float16 if t.is_floating_point() else t.dtype, device="cuda")
                    table[name] = nn.Parameter(f, requires_grad=False) if table is m._parameters else f
    return module


def guarded_run(kind: str, size: int, stochastic: bool = False) -> tuple[CudaGuard, list[int]]:
    """A whole run (2 phases, 2 steps each, jitter on, no decode; ``stochastic``: Euler-ancestral,
    a noise canvas per step) on fake CUDA under a strict guard and
    ``torch.use_deterministic_algorithms(True)``; returns the guard and the number of blocking
    host→device copies seen at each step's callback."""
    mode = _mode()
    unet, vae, text, scheduler = random_components(kind, device="meta", dtype=torch.float16)
    for module in (unet, vae, text.text_encoder, text.text_encoder_2):
        _fake_cuda(module, mode)
    if stochastic:
        scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler.config)
    pipe = DemoFusionPipeline(unet, vae, text, scheduler, name=f"fake-cuda {kind}")
    guard, marks = CudaGuard(), []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with mode, guard:
            pipe("a lighthouse at dusk", height=size, width=size, num_inference_steps=2, view_batch_size=16, seed=3,
                 output_type="latent", offload_text_encoders=False,
                 callback=lambda phase, i, t, z: marks.append(len(guard.blocking)))
    finally:
        torch.use_deterministic_algorithms(was)
    return guard, marks


def _per_step_blocking(marks: list[int]) -> list[int]:
    """Blocking copies made by each phase's second step (the first carries the phase's setup)."""
    return [marks[k + 1] - marks[k] for k in range(0, len(marks), 2)]


@pytest.fixture(scope="module", params=["euler", "euler-ancestral"])
def tiny_guarded(request):
    """Euler: the phase's jitter drawn at once; Euler-ancestral: jitter and noise drawn per step."""
    return guarded_run("tiny", 512, stochastic=request.param == "euler-ancestral")


def test_whole_tiny_run_has_no_nondeterministic_op(tiny_guarded):
    guard, marks = tiny_guarded  # a nondeterministic op would have raised inside the run
    assert guard.nondeterministic == [] and len(marks) == 4


def test_whole_tiny_run_has_no_blocking_copy_per_step(tiny_guarded):
    """None in a step; none after phase 1's first step at all (phase 2's ε_2 and corners included)."""
    guard, marks = tiny_guarded
    assert _per_step_blocking(marks) == [0, 0] and marks[0] == marks[-1] == len(guard.blocking)
    assert any(c[2] and c[3] for c in guard.h2d)  # the corners (and noise) came, pinned and non-blocking


@pytest.mark.slow
def test_whole_sdxl_run_is_deterministic_and_copy_free_per_step():
    """SDXL shapes (2.6 B UNet), 2048² from 1024² (2 phases): no CUDA-nondeterministic
    op, no blocking copy per step, under ``torch.use_deterministic_algorithms(True)``."""
    guard, marks = guarded_run("sdxl-base", 2048)
    assert guard.nondeterministic == [] and len(marks) == 4 and _per_step_blocking(marks) == [0, 0]
    assert marks[0] == marks[-1] == len(guard.blocking)


# ---- the phase's random numbers: the documented order, drawn ahead -------------------------------
def _documented_draws(g, steps, starts, size, win, J, noise_shape):
    """Per step, as the loop drew them before: the jitter from ``g`` ([V,2] float64), then the noise."""
    out = []
    for _ in range(steps):
        corners = jitter_views(starts, size, win, J, g)
        out.append((corners, None if noise_shape is None else torch.randn(noise_shape, generator=g)))
    return out


@pytest.mark.parametrize("noise_shape", [None, (2, 4, 20, 28)])
def test_phase_draws_are_the_per_step_draws_in_order(noise_shape):
    """Drawn ahead (no noise: one [S,V,2] draw) or per step (jitter, then noise): the same numbers
    as the per-step loop, bit for bit, and the generator left where that loop leaves it."""
    starts, size, win = local_views(20, 28, (16, 16), 4), (20, 28), (16, 16)
    J = jitter_range(16, 4)
    place = lambda u: starts + J if u is None else jitter_views(starts, size, win, J, u=u)
    g, g_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    draws = PhaseDraws(g, 5, "cpu", place, True, noise_shape)
    want = _documented_draws(g_ref, 5, starts, size, win, J, noise_shape)
    for i, (corners, noise) in enumerate(want):
        got_corners, got_noise = draws.step(i)
        assert torch.equal(got_corners.host, corners) and torch.equal(got_corners.device, corners)
        assert (got_noise is None) == (noise is None) and (noise is None or torch.equal(got_noise, noise))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=g_ref))
    fixed = PhaseDraws(g, 5, "cpu", place, False, None)  # jitter off: the unmoved corners, nothing drawn
    assert torch.equal(fixed.step(3)[0].host, starts + J) and torch.equal(g.get_state(), g_ref.get_state())


@pytest.mark.parametrize("kind, stride", [("sdxl", 4), ("turbo", 4), ("turbo", 8)])
def test_a_run_draws_jitter_and_noise_in_the_documented_order(kind, stride):
    """The corners and noise canvases a whole run uses (2 phases, jitter on; turbo: Euler-ancestral;
    stride 8 = the window: no margin, so no jitter drawn) equal a transcription of the documented
    order from the seed: old seeds replay."""
    corners, noises = [], []
    mech = Mechanisms(multidiffusion_views=lambda z, p, j, g=None, c=None: corners.append(c.host.clone())
                      or A.multidiffusion_views(z, p, j, g, c))
    pipe = small_pipeline(kind, sample_size=8)
    pipe.mechanisms = mech
    step_at = pipe.scheduler.step_at
    pipe.scheduler.step_at = lambda *a, noise=None, **k: noises.append(noise) or step_at(*a, noise=noise, **k)
    pipe(prompt="a lighthouse", height=128, width=128, num_inference_steps=2, seed=5, output_type="latent",
         view_batch_size=4, stride=stride)
    root = torch.Generator().manual_seed(5)
    g1, g2 = [torch.Generator().manual_seed(int(v)) for v in torch.randint(2**62, (2,), generator=root)]
    stochastic = kind == "turbo"
    torch.randn((1, 4, 8, 8), generator=g1)  # phase 1: the starting noise, then a canvas per step
    want_noise = [torch.randn((1, 4, 8, 8), generator=g1) if stochastic else None for _ in range(2)]
    torch.randn((1, 4, 16, 16), generator=g2)  # phase 2: ε_2, then per step the jitter and a canvas
    starts, J = local_views(16, 16, (8, 8), stride), jitter_range(8, stride)
    want = _documented_draws(g2, 2, starts, (16, 16), (8, 8), J, (1, 4, 16, 16) if stochastic else None)
    want_noise += [n for _, n in want]
    assert len(corners) == 2 and all(torch.equal(a, b) for a, (b, _) in zip(corners, want))
    assert len(noises) == 4 and all((a is None and b is None) or torch.equal(a, b) for a, b in zip(noises, want_noise))


class _StubUNet(nn.Module):
    """A one-layer stand-in with the UNet's signature: tracing the step, not the network."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x, t, emb, pooled, time_ids):
        return self.conv(x) * (t + time_ids.sum(1) + pooled.sum(1) + emb.mean((1, 2)))[:, None, None, None]


def test_an_upscaling_step_with_jitter_traces_as_one_graph():
    """``algorithm.upscale_step`` (skip residual, D(z, i) with jittered windows and dilated paths,
    an Euler-ancestral step with its noise): 1 graph, 0 breaks."""
    import torch._dynamo

    s = dataclasses.replace(validate(64, prompt="a", height=128, width=128, num_inference_steps=2,
                                     output_type="latent"), view_batch_size=4)
    sched = from_config(SDXL_TURBO_CONFIG)
    sched.set_timesteps(2)
    e, p = torch.randn(1, 77, 8), torch.randn(1, 8)
    cond = Conditioning(e, p, torch.zeros_like(e), torch.zeros_like(p), torch.tensor([[128.0, 128, 0, 0, 128, 128]]))
    D = A.MultiViewDenoiser(GuidedUNet(_StubUNet(), sched, cond, 1, 4, 7.5), Mechanisms(), s, 1)
    z = torch.randn(1, 4, 16, 16)
    draws = PhaseDraws(torch.Generator().manual_seed(0), 2, "cpu", D.place, True, z.shape)
    draws.step(0)
    corners, noise = draws.step(1)
    assert [v.path for v in D.layout] == ["local", "global"] and D.local.margin > 0 and noise is not None
    with torch.no_grad():
        explained = torch._dynamo.explain(A.upscale_step)(sched, D, Mechanisms(), s, z, torch.randn_like(z),
                                                          torch.randn_like(z), 1, corners, noise)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
