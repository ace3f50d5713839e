"""Same seed, same bits on a GPU (issue 23): the CUDA determinism guard, the deterministic view
merge, and whole runs on fake CUDA (tests/helpers/determinism.py; fake CUDA: tests/test_fake_cuda.py).

What each whole-run test asserts is written in its name and docstring: no CUDA-nondeterministic
op in a whole run (holds now); no blocking host→device copy per step (expected to fail until the
view corners, crops and noise live on the device — the denoiser's part of issue 23).
"""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from demofusion.ops import gather_views, jitter_range, jitter_views, local_views, scatter_add_views
from demofusion.ops.views import _flat_index
from demofusion.presets import random_components
from demofusion.pipeline import DemoFusionPipeline
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
    assert [(c[1], c[2], c[3]) for c in guard.h2d] == [((2, 2), False, False), ((3,), True, True), ((3,), False, False)]
    assert [c[1] for c in guard.blocking] == [(2, 2), (3,)]


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


def guarded_run(kind: str, size: int) -> tuple[CudaGuard, list[int]]:
    """A whole run (2 phases, 2 steps each, jitter on, no decode) on fake CUDA under a strict
    guard; returns it and the number of host→device copies seen at each step's callback."""
    mode = _mode()
    unet, vae, text, scheduler = random_components(kind, device="meta", dtype=torch.float16)
    for module in (unet, vae, text.text_encoder, text.text_encoder_2):
        _fake_cuda(module, mode)
    pipe = DemoFusionPipeline(unet, vae, text, scheduler, name=f"fake-cuda {kind}")
    guard, marks = CudaGuard(), []
    with mode, guard:
        pipe("a lighthouse at dusk", height=size, width=size, num_inference_steps=2, view_batch_size=16, seed=3,
             output_type="latent", offload_text_encoders=False,
             callback=lambda phase, i, t, z: marks.append(len(guard.blocking)))
    return guard, marks


def _per_step_blocking(marks: list[int]) -> list[int]:
    """Blocking copies made by each phase's second step (the first carries the phase's setup)."""
    return [marks[k + 1] - marks[k] for k in range(0, len(marks), 2)]


@pytest.fixture(scope="module")
def tiny_guarded():
    return guarded_run("tiny", 512)


def test_whole_tiny_run_has_no_nondeterministic_op(tiny_guarded):
    guard, marks = tiny_guarded  # a nondeterministic op would have raised inside the run
    assert guard.nondeterministic == [] and len(marks) == 4


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="view corners, crops and jitter still copied from the host every "
                   "step (the denoiser's part of issue 23); remove this mark when it lands")
def test_whole_tiny_run_has_no_blocking_copy_per_step(tiny_guarded):
    assert _per_step_blocking(tiny_guarded[1]) == [0, 0]


@pytest.mark.slow
def test_whole_sdxl_run_has_no_nondeterministic_op():
    """SDXL shapes (2.6 B UNet), 2048² from 1024² (2 phases): acceptance 1's determinism half."""
    guard, marks = guarded_run("sdxl-base", 2048)
    assert guard.nondeterministic == [] and len(marks) == 4


def test_view_ops_trace_as_one_graph():
    """Jitter (from pre-drawn uniforms), gather and the fixed-order merge: one graph, no break
    (``torch.rand(generator=…)`` inside a step would break it: draw ahead, pass ``u``)."""
    import torch._dynamo

    base = local_views(24, 24, (16, 16), 8)
    J = jitter_range(16, 8)

    def step(z, u):
        starts = jitter_views(base, (24, 24), (16, 16), J, u=u)
        views = gather_views(z, starts, (16, 16))
        total, count = scatter_add_views(views * 2, starts, tuple(z.shape))
        return total / count

    z, u = torch.randn(1, 4, 24 + 2 * J, 24 + 2 * J), torch.rand(base.shape, dtype=torch.float64)
    explained = torch._dynamo.explain(step)(z, u)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
