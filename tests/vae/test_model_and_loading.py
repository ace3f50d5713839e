"""SDXL VAE: architecture/keys vs diffusers, fp32 parity, loading every layout, fp16 overflow."""

from __future__ import annotations

import warnings

import pytest
import torch

from demofusion.vae import AutoencoderKL, FP16OverflowError, VAEConfig, load_vae
from demofusion.weights import WeightsError
from tests.helpers import assert_close_rel, save_tensors, seeded_init_
from tests.helpers.vae import (
    SDXL_VAE_CONFIG,
    diffusers_from_ldm,
    diffusers_kwargs,
    diffusers_vae,
    ldm_checkpoint,
)

torch.set_grad_enabled(False)


def _inputs(seed=0, batch=2, size=(48, 80)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, *size, generator=g) * 2 - 1
    z = torch.randn(batch, 4, size[0] // 8, size[1] // 8, generator=g)
    return x, z


def _check_parity(ours, ref, x, z, what):
    post, rpost = ours.encode(x), ref.encode(x).latent_dist
    assert_close_rel(post.mean, rpost.mean, what=f"{what} encode mean")
    assert_close_rel(post.std, rpost.std, what=f"{what} encode std")
    assert_close_rel(ours.decode(z), ref.decode(z).sample, what=f"{what} decode")


# ---- keys and shapes ---------------------------------------------------------------------------
@pytest.mark.parity
def test_sdxl_keys_and_shapes_equal_diffusers_on_meta():
    from diffusers import AutoencoderKL as Ref

    with torch.device("meta"):
        ref = Ref(**diffusers_kwargs("sdxl"))
        ours = AutoencoderKL(VAEConfig.from_diffusers(SDXL_VAE_CONFIG))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert len(mine) == 248 and sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert VAEConfig.from_diffusers(SDXL_VAE_CONFIG) == VAEConfig.preset("sdxl")
    assert ours.scaling_factor == 0.13025 and ours.scale_factor == 8


@pytest.mark.parity
def test_tiny_preset_matches_diffusers_tiny():
    from tests.helpers.vae import TINY_VAE_CONFIG

    assert VAEConfig.from_diffusers(TINY_VAE_CONFIG) == VAEConfig.preset("tiny")
    ref, ours = diffusers_vae("tiny"), AutoencoderKL(VAEConfig.preset("tiny"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_config_rejects_other_architectures():
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        VAEConfig.from_diffusers({**SDXL_VAE_CONFIG, "down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(20, 40), norm_num_groups=32)


# ---- fp32 parity -------------------------------------------------------------------------------
@pytest.mark.parity
def test_tiny_fp32_parity_non_square(tmp_path):
    ref = diffusers_vae("tiny", seed=1)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path)
    x, z = _inputs(size=(48, 80))
    _check_parity(ours, ref, x, z, "tiny")
    # sampling draws ε exactly as diffusers does
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert_close_rel(ours.encode(x).sample(g1), ref.encode(x).latent_dist.sample(g2), what="sample")


@pytest.mark.parity
def test_sdxl_shaped_fp32_parity_small_non_square(tmp_path):
    ref = diffusers_vae("sdxl", seed=2)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.config == VAEConfig.preset("sdxl")
    x, z = _inputs(batch=1, size=(40, 56))
    _check_parity(ours, ref, x, z, "sdxl")


# ---- loading layouts -----------------------------------------------------------------------------
def test_loads_folder_subfolder_file_and_fp16_variant(tmp_path):
    ref = diffusers_vae("tiny", seed=3)
    ref.save_pretrained(tmp_path / "m" / "vae")
    ref.half().save_pretrained(tmp_path / "h" / "vae", variant="fp16")
    x, z = _inputs(batch=1, size=(32, 40))
    expect = load_vae(tmp_path / "m").decode(z)
    for p in (tmp_path / "m" / "vae", tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"):
        assert torch.equal(load_vae(p).decode(z), expect)
    v16 = load_vae(tmp_path / "h")
    assert v16.dtype == torch.float16
    assert load_vae(tmp_path / "h", variant="fp16", dtype="fp32").dtype == torch.float32
    # a bare .safetensors with diffusers keys and no config.json: architecture from the shapes
    bare = save_tensors(tmp_path / "bare" / "vae.safetensors", ref.float().state_dict())
    assert load_vae(bare).config == VAEConfig.preset("tiny")


def test_deprecated_diffusers_attention_names_load(tmp_path):
    ref = diffusers_vae("tiny", seed=4)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        sd[k] = v
    f = save_tensors(tmp_path / "old.safetensors", sd)
    _, z = _inputs(batch=1, size=(32, 32))
    assert_close_rel(load_vae(f).decode(z), ref.decode(z).sample, what="deprecated names")


# ---- single file ---------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny", "sdxl"])
def test_single_file_keys_load_and_match_diffusers_converter(tmp_path, name):
    src = diffusers_vae(name, seed=5)
    ck = ldm_checkpoint(src.state_dict(), levels=4)
    assert ck["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    f = save_tensors(tmp_path / "sd_xl_checkpoint.safetensors", ck)
    ours = load_vae(f)  # architecture inferred from the shapes
    ref, ref_sd = diffusers_from_ldm(ck, name)
    # same tensors under the same names as diffusers' converter …
    mine = ours.state_dict()
    assert sorted(mine) == sorted(ref_sd)
    assert all(torch.equal(mine[k], ref_sd[k].reshape(mine[k].shape)) for k in mine)
    # … and identical outputs
    x, z = _inputs(batch=1, size=(32, 48))
    _check_parity(ours, ref, x, z, f"single-file {name}")


def test_single_file_without_vae_and_pickles_are_refused(tmp_path):
    f = save_tensors(tmp_path / "unet_only.safetensors", {"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(WeightsError, match="without a VAE"):
        load_vae(f)
    torch.save(diffusers_vae("tiny").state_dict(), tmp_path / "vae.bin")
    with pytest.raises(WeightsError, match="pickle"):
        load_vae(tmp_path / "vae.bin")
    assert load_vae(tmp_path / "vae.bin", allow_pickle=True).config == VAEConfig.preset("tiny")


def test_wrong_tensors_name_the_problem(tmp_path):
    sd = diffusers_vae("tiny").state_dict()
    sd.pop("decoder.conv_out.bias")
    f = save_tensors(tmp_path / "broken.safetensors", sd)
    with pytest.raises(WeightsError, match="decoder.conv_out.bias"):
        load_vae(f, config="tiny")
    with pytest.raises(ValueError, match="multiples of 8"):
        AutoencoderKL(VAEConfig.preset("tiny")).encode(torch.zeros(1, 3, 20, 16))


# ---- fp16 overflow ---------------------------------------------------------------------------------
def _overflowing_fp16_file(tmp_path):
    """A tiny VAE whose first convs are scaled so that float16 activations overflow (weights stay finite)."""
    ref = diffusers_vae("tiny", seed=6)
    ref.decoder.conv_in.weight.mul_(3e4)
    ref.encoder.conv_in.weight.mul_(3e4)
    ref.half().save_pretrained(tmp_path / "vae", variant="fp16")
    return ref, tmp_path / "vae"


def test_fp16_overflow_upcasts_once_and_matches_fp32(tmp_path):
    ref16, path = _overflowing_fp16_file(tmp_path)
    x, z = _inputs(batch=1, size=(32, 48))
    x16, z16 = x.half(), z.half()
    # the reference really overflows in float16 …
    assert not torch.isfinite(ref16.decode(z16).sample).all()
    vae = load_vae(path)
    assert vae.dtype == torch.float16
    with pytest.warns(RuntimeWarning, match="overflowed in float16"):
        out = vae.decode(z16)
    assert vae.dtype == torch.float32 and out.dtype == torch.float32
    # … ours equals the same fp16-stored weights run in float32
    expect = load_vae(path, dtype=torch.float32)
    assert_close_rel(out, expect.decode(z16.float()), tol=1e-5, what="upcast decode")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already float32: no second warning
        assert_close_rel(vae.encode(x16).mean, expect.encode(x16.float()).mean, tol=1e-5, what="encode")


def test_fp16_overflow_encode_also_upcasts(tmp_path):
    _, path = _overflowing_fp16_file(tmp_path)
    x, _ = _inputs(batch=1, size=(32, 48))
    vae = load_vae(path)
    with pytest.warns(RuntimeWarning, match="encode overflowed"):
        m = vae.encode(x.half()).mean
    assert torch.isfinite(m).all() and vae.dtype == torch.float32


def test_fp16_overflow_can_raise(tmp_path):
    _, path = _overflowing_fp16_file(tmp_path)
    vae = load_vae(path, on_fp16_overflow="raise")
    _, z = _inputs(batch=1, size=(32, 48))
    with pytest.raises(FP16OverflowError, match="fp16-fix"):
        vae.decode(z.half())
    assert vae.dtype == torch.float16
    with pytest.raises(ValueError, match="on_fp16_overflow"):
        load_vae(path, on_fp16_overflow="ignore")


def test_fp16_fixed_weights_run_in_fp16_without_upcast(tmp_path):
    ref = diffusers_vae("tiny", seed=7)
    ref.half().save_pretrained(tmp_path / "vae", variant="fp16")
    vae = load_vae(tmp_path / "vae")
    x, z = _inputs(batch=1, size=(32, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, mean = vae.decode(z.half()), vae.encode(x.half()).mean
    assert vae.dtype == torch.float16 and out.dtype == torch.float16
    expect = load_vae(tmp_path / "vae", dtype=torch.float32)
    assert_close_rel(out, expect.decode(z.half().float()), tol=2e-2, what="fp16 decode")
    assert_close_rel(mean, expect.encode(x.half().float()).mean, tol=2e-2, what="fp16 encode")


@pytest.mark.parity
def test_save_vae_writes_a_folder_diffusers_loads(tmp_path):
    from diffusers import AutoencoderKL as Ref

    from demofusion.vae import save_vae

    ours = load_vae(_save(diffusers_vae("tiny", seed=8), tmp_path / "src"))
    save_vae(ours, tmp_path / "out")
    ref = Ref.from_pretrained(tmp_path / "out").eval()
    _, z = _inputs(batch=1, size=(32, 40))
    assert_close_rel(ours.decode(z), ref.decode(z).sample, what="save_vae round trip")
    assert load_vae(tmp_path / "out").config == ours.config


def _save(ref, folder):
    ref.save_pretrained(folder)
    return folder
