"""Pipeline behaviour: ablation switches, determinism, batching, img2img, resume, errors."""


import numpy as np
import pytest
import torch
from PIL import Image

from demofusion.pipeline import Mechanisms
from tests.helpers.pipeline import record_steps, small_pipeline

KW = dict(prompt="a castle", height=384, width=384, num_inference_steps=2, guidance_scale=7.5, seed=5, stride=8,
          output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline("sdxl")


def run(pipe, **kw):
    return record_steps(pipe, **{**KW, **kw})


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def close(a, b, tol=1e-5):
    """Equal up to GEMM rounding: the runs batch different views into their UNet calls (one path
    alone vs both paths' views together), and a batch's rounding depends on its size and threads."""
    return a.keys() == b.keys() and all(((a[k] - b[k]).abs().max() <= tol * a[k].abs().max()).item() for k in a)


def test_switches_act_only_where_they_claim(pipe):
    full_out, full = run(pipe)
    # switches act in the upscaling phases only: phase 1 is bit-identical everywhere
    for switch in ("skip_residual", "local_paths", "dilated_sampling", "dilated_blur", "renormalise", "view_jitter"):
        out, steps = run(pipe, **{switch: False})
        assert all(torch.equal(steps[k], full[k]) for k in full if k[0] == 1), switch
        assert not torch.allclose(out.latents[-1], full_out.latents[-1]), f"{switch}=False changed nothing"

    # dilated sampling off ⇒ exactly the local-only path (fuse swapped for "take z_local")
    local_only = Mechanisms(fuse=lambda zl, zg, c, a2: zl)
    _, a = run(pipe, dilated_sampling=False)
    _, b = record_steps(_with(pipe, local_only), **KW)
    assert close(a, b)
    # local paths off ⇒ exactly the global-only path
    _, a = run(pipe, local_paths=False)
    _, b = record_steps(_with(pipe, Mechanisms(fuse=lambda zl, zg, c, a2: zg)), **KW)
    assert close(a, b)
    # skip residual off ⇒ the skip-residual mechanism replaced by the identity
    _, a = run(pipe, skip_residual=False)
    _, b = record_steps(_with(pipe, Mechanisms(skip_residual=lambda z, zh, c, a1: z)), **KW)
    assert same(a, b)
    # renormalisation off changes only what follows a phase end: phase 2 is untouched
    _, a = run(pipe, renormalise=False)
    assert all(torch.equal(a[k], full[k]) for k in full if k[0] <= 2)
    assert not torch.equal(a[(3, 0)], full[(3, 0)])
    with pytest.raises(ValueError, match="at least one path"):
        run(pipe, local_paths=False, dilated_sampling=False)


def _with(pipe, mechanisms):
    from demofusion import DemoFusionPipeline

    return DemoFusionPipeline(pipe.unet, pipe.vae, pipe.text, pipe.scheduler, mechanisms=mechanisms)


def test_same_seed_same_result_and_seed_matters(pipe):
    a, _ = run(pipe)
    b, _ = run(pipe)
    c, _ = run(pipe, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))
    assert not torch.allclose(a.latents[-1], c.latents[-1])


def test_explicit_noise_replays_any_seed(pipe):
    """latents + upscale_noise given and jitter off ⇒ the seed no longer matters."""
    z1 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = [torch.randn(1, 4, 32, 32), torch.randn(1, 4, 48, 48)]
    a, _ = run(pipe, latents=z1, upscale_noise=eps, view_jitter=False, seed=1)
    b, _ = run(pipe, latents=z1, upscale_noise=eps, view_jitter=False, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))


@pytest.mark.parametrize("kind", ["sdxl", "turbo"])
def test_results_independent_of_view_batch_size(kind):
    p = small_pipeline(kind)
    g = 7.5 if kind == "sdxl" else 0.0
    ref, _ = run(p, view_batch_size=1, guidance_scale=g)
    for vbs in (3, 16):
        out, _ = run(p, view_batch_size=vbs, guidance_scale=g)
        for x, y in zip(out.latents, ref.latents):
            assert (x - y).abs().max() <= 1e-5 * y.abs().max()


def test_reference_compat_reproduces_the_batch_dependent_stale_scaling(pipe):
    """reference_compat keeps the reference's stale σ, which makes results depend on batching."""
    a, sa = run(pipe, reference_compat=True, view_batch_size=1)
    b, sb = run(pipe, reference_compat=True, view_batch_size=16)
    d, sd = run(pipe, view_batch_size=16)
    assert all(torch.allclose(sa[k], sd[k], rtol=0, atol=1e-5 * sd[k].abs().max()) for k in sd if k[0] == 1)
    assert not torch.allclose(a.latents[-1], b.latents[-1], atol=1e-3)
    assert not torch.allclose(b.latents[-1], d.latents[-1], atol=1e-3)


def test_resume_from_finished_phases_is_bit_identical(pipe):
    full, _ = run(pipe)
    for k in (1, 2):
        resumed, steps = run(pipe, resume_latents=full.latents[:k])
        assert min(p for p, _ in steps) == k + 1  # finished phases are not recomputed
        assert torch.equal(resumed.latents[-1], full.latents[-1])


def test_text_to_image_end_to_end_non_square(tmp_path):
    p = small_pipeline("sdxl")
    seen = []
    out = p("a harbour at night", height=192, width=384, num_inference_steps=2, stride=8, seed=0,
            preview_dir=tmp_path, on_phase_end=lambda k, img, z: seen.append((k, img.size, tuple(z.shape))))
    assert [im.size for im in out.images] == [(128, 64), (256, 128), (384, 192)]
    assert seen == [(1, (128, 64), (1, 4, 8, 16)), (2, (256, 128), (1, 4, 16, 32)), (3, (384, 192), (1, 4, 24, 48))]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["phase_1.png", "phase_2.png", "phase_3.png"]
    for im in out.images:
        a = np.asarray(im)
        assert a.dtype == np.uint8 and a.std() > 0
    assert out.unet_calls[0] == 2 and all(n > 0 for n in out.unet_calls)


def test_image_to_image_end_to_end_non_square():
    p = small_pipeline("turbo")
    img = Image.fromarray((np.random.default_rng(0).random((100, 60, 3)) * 255).astype(np.uint8))
    out = p("a portrait", image=img, height=384, width=256, num_inference_steps=2, guidance_scale=0.0,
            stride=8, seed=0)
    # img2img: every phase (from 1) is an upscaling phase started from the encoded image
    assert [im.size for im in out.images] == [(88, 128), (168, 256), (256, 384)]
    assert [tuple(z.shape[-2:]) for z in out.latents] == [(16, 11), (32, 21), (48, 32)]
    assert out.unet_calls[0] > 0


def test_turbo_base_size_is_selectable():
    p = small_pipeline("turbo", sample_size=16)
    out = p("x", height=512, width=512, base_size=256, num_inference_steps=1, guidance_scale=0.0, stride=16,
            output_type="latent")
    assert len(out.latents) == 2 and out.latents[-1].shape[-2:] == (64, 64)


def test_clear_errors(pipe):
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe("x", height=388, width=384)
    with pytest.raises(ValueError, match="at least the base size 128"):
        pipe("x", height=120, width=384)
    with pytest.raises(ValueError, match="stride"):
        pipe("x", height=384, width=384, stride=64)


def test_image_to_image_resume_is_bit_identical():
    p = small_pipeline("sdxl")
    img = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    kw = dict(image=img, height=384, width=384, num_inference_steps=2, stride=8, seed=0, output_type="latent")
    full = p("x", **kw)
    resumed = p("x", resume_latents=full.latents[:2], **kw)
    assert len(resumed.latents) == 3 and torch.equal(resumed.latents[-1], full.latents[-1])


def test_from_pretrained_diffusers_folder_equals_in_memory(tmp_path):
    from demofusion import DemoFusionPipeline

    p = small_pipeline("turbo")
    folder = p.save_pretrained(tmp_path / "model")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer_2" / "vocab.json").is_file() and (folder / "model_index.json").is_file()
    q = DemoFusionPipeline.from_pretrained(folder)
    assert type(q.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert q.unet.config.sample_size == 16
    kw = dict(height=384, width=384, num_inference_steps=2, guidance_scale=0.0, stride=8, output_type="latent")
    a, b = p("x", **kw), q("x", **kw)
    # same weights; only float rounding may differ (the reloaded projection's memory layout)
    assert all((x - y).abs().max() <= 1e-5 * y.abs().max() for x, y in zip(a.latents, b.latents))


def test_from_pretrained_missing_weights_says_how_to_download(tmp_path):
    from demofusion import DemoFusionPipeline, WeightsError

    with pytest.raises(WeightsError, match="demofusion download"):
        DemoFusionPipeline.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="demofusion download sdxl-base"):
        DemoFusionPipeline.from_pretrained("sdxl-base")


def test_compiled_unet_gives_the_same_result(tmp_path):
    # aot_eager traces and runs the captured graph without generating kernels: the graph capture is
    # what is tested here (inductor kernels take minutes to build on CPU; docs/api.md).
    eager = small_pipeline("sdxl")
    want, _ = run(eager)
    compiled = small_pipeline("sdxl").compile(backend="aot_eager")
    assert compiled.unet._compiled_call_impl is not None
    torch._dynamo.utils.counters.clear()
    got, _ = run(compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the UNet really went through dynamo
    assert all(torch.equal(g, w) for g, w in zip(got.latents, want.latents))
    assert set(compiled.unet.state_dict()) == set(eager.unet.state_dict())  # no _orig_mod. prefixes
    compiled.save_pretrained(tmp_path)


def test_random_components_kinds():
    from demofusion.presets import random_components, tiny_components

    a, b = tiny_components(seed=3), random_components("tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()))
    with pytest.raises(ValueError, match="unknown random preset 'sdxl'.*sdxl-base"):
        random_components("sdxl")


def test_explicit_phase_sizes(pipe):
    default, _ = run(pipe)
    assert default.phase_sizes == [(128, 128), (256, 256), (384, 384)]
    same_sizes, _ = run(pipe, phase_sizes=default.phase_sizes)
    assert all(torch.equal(a, b) for a, b in zip(same_sizes.latents, default.latents))
    # two phases straight to the target: phase 2 dilates by 2 (not 3) and denoises a 48² latent
    two, _ = run(pipe, phase_sizes=[(128, 128), (384, 384)])
    assert two.phase_sizes == [(128, 128), (384, 384)] and two.latents[-1].shape[-2:] == (48, 48)
    assert torch.equal(two.latents[0], default.latents[0])
    for bad, msg in (([(128, 128), (256, 256)], "end with the target"), ([(132, 128), (384, 384)], "multiple of 8"),
                     ([(256, 256), (128, 128), (384, 384)], "must not shrink")):
        with pytest.raises(ValueError, match=msg):
            run(pipe, phase_sizes=bad)
    with pytest.raises(ValueError, match="phases=2 but phase_sizes has 3"):
        run(pipe, phase_sizes=default.phase_sizes, phases=2)
    with pytest.raises(ValueError, match="reference_compat"):
        run(pipe, phase_sizes=default.phase_sizes, reference_compat=True)
