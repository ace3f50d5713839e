"""load_unet: single-file (SGM) checkpoints, variants, dtypes, inference of the config, bad input."""

import json

import pytest
import torch

from demofusion.unet import UNet, UNetConfig, infer_config, load_unet
from demofusion.unet.convert import PREFIX, convert_sgm_unet
from demofusion.weights import WeightsError
from tests.helpers import assert_close_rel, max_rel_err, save_tensors
from tests.helpers.unet import (
    MID_CONFIG, SDXL_BASE_CONFIG, diffusers_forward, diffusers_unet, tiny_config, to_sgm, unet_inputs,
    write_diffusers,
)


def _ours(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module")
def tiny_ref():
    return diffusers_unet(tiny_config(), seed=3)


# --- single-file (SGM) layout ------------------------------------------------------------------

@pytest.mark.parity
def test_sgm_map_agrees_with_diffusers_converter_on_real_sdxl():
    """For the full SDXL structure (meta tensors): our SGM names, fed to diffusers' own converter,
    come back as the very same tensors under the same names; and our converter inverts them."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        sd = UNet("sdxl-base").state_dict()
    sgm = to_sgm(sd, SDXL_BASE_CONFIG)
    theirs = convert_ldm_unet_checkpoint(sgm, SDXL_BASE_CONFIG)
    assert set(theirs) == set(sd) and all(theirs[k] is sd[k] for k in sd)
    ours = convert_sgm_unet({k[len(PREFIX):]: v for k, v in sgm.items()})
    assert set(ours) == set(sd) and all(ours[k] is sd[k] for k in sd)
    assert infer_config(ours) == UNetConfig.preset("sdxl-base")
    assert infer_config(ours, kind="sdxl-turbo") == UNetConfig.preset("sdxl-turbo")


@pytest.mark.parity
@pytest.mark.parametrize("name", ["tiny", "mid"])
def test_single_file_matches_diffusers_converter(tmp_path, name, monkeypatch):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    import safetensors

    cfg = tiny_config() if name == "tiny" else MID_CONFIG
    src = diffusers_unet(cfg, seed=5)
    tensors = to_sgm(src.state_dict(), cfg)
    other = {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    path = save_tensors(tmp_path / "sd_xl_tiny.safetensors", {**tensors, **other})
    (tmp_path / "config.json").write_text('{"unrelated": true}')  # must not be taken for the UNet's

    read = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, k):
            read.append(k)
            return self.f.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    ours = load_unet(path, kind="tiny") if name == "tiny" else load_unet(path, config=cfg)
    monkeypatch.undo()
    assert sorted(read) == sorted(tensors), "only the UNet's tensors may be read"
    assert ours.config == UNetConfig.from_diffusers(cfg)

    from safetensors.torch import load_file

    theirs = UNet2DConditionModel.from_config(cfg)
    converted = convert_ldm_unet_checkpoint(load_file(str(path)), cfg)
    theirs.load_state_dict(converted, strict=True)
    theirs.eval()
    inputs = unet_inputs(cfg, batch=2, h=16, w=24)
    want = diffusers_forward(theirs, inputs)
    assert_close_rel(_ours(ours, inputs), want, 1e-4, f"{name} single-file")
    # and both equal the model the tensors came from
    assert_close_rel(diffusers_forward(src, inputs), want, 1e-6)


def test_single_file_unexpected_key_named_as_in_file(tmp_path, tiny_ref):
    tensors = to_sgm(tiny_ref.state_dict(), tiny_config())
    tensors[PREFIX + "output_blocks.0.0.extra.weight"] = torch.ones(3)
    tensors[PREFIX + "output_blocks.0.7.weight"] = torch.ones(3)
    path = save_tensors(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(WeightsError, match=r"2 unexpected key.*\n\s+model\.diffusion_model\.output_blocks\.0\.0\.extra\.weight\n"
                                           r"\s+model\.diffusion_model\.output_blocks\.0\.7\.weight"):
        load_unet(path, kind="tiny")


# --- diffusers layouts, variants, dtypes --------------------------------------------------------

def test_layouts_and_fp16_variant(tmp_path, tiny_ref):
    cfg = tiny_config()
    write_diffusers(tmp_path / "full", tiny_ref)
    write_diffusers(tmp_path / "half", tiny_ref, variant="fp16", dtype=torch.float16)
    inputs = unet_inputs(cfg, batch=2, h=16, w=16)
    want = diffusers_forward(tiny_ref, inputs)
    # model folder, unet/ subfolder, the file itself
    for p in (tmp_path / "full", tmp_path / "full" / "unet",
              tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors"):
        assert_close_rel(_ours(load_unet(p), inputs), want, 1e-4, str(p))
    # diffusers-named file with no config.json beside it: config inferred from shapes + kind
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    m = load_unet(lone, kind="tiny")
    assert m.config == UNetConfig.preset("tiny")
    assert_close_rel(_ours(m, inputs), want, 1e-4, "inferred config")
    # fp16 variant: found without asking, dtype kept, or cast on request
    for kw in ({}, {"variant": "fp16"}):
        m = load_unet(tmp_path / "half", **kw)
        assert m.dtype == torch.float16 and all(p.dtype == torch.float16 for p in m.parameters())
    m = load_unet(tmp_path / "half", dtype=torch.float32)
    assert m.dtype == torch.float32
    assert max_rel_err(_ours(m, inputs), want) < 1e-2  # fp16-rounded weights, fp32 compute
    with pytest.raises(WeightsError, match="fp32"):
        load_unet(tmp_path / "full", variant="fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_on_cpu(tmp_path, tiny_ref, dtype):
    write_diffusers(tmp_path, tiny_ref)
    m = load_unet(tmp_path, dtype=dtype)
    assert m.dtype == dtype and all(p.dtype == dtype for p in m.state_dict().values())
    inputs32 = unet_inputs(tiny_config(), batch=2, h=16, w=24)
    sample, ts, ctx, pooled, ids = inputs32  # timesteps and time ids stay fp32, as a pipeline passes them
    inputs = (sample.to(dtype), ts, ctx.to(dtype), pooled.to(dtype), ids)
    out = _ours(m, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = diffusers_forward(tiny_ref, inputs32)
    theirs = diffusers_forward(diffusers_unet(tiny_config(), seed=3, dtype=dtype), inputs)
    # same dtype: equal to diffusers to within that dtype's rounding; error vs fp32 no worse than theirs
    assert max_rel_err(out, theirs) < (2e-2 if dtype == torch.bfloat16 else 5e-3)
    assert max_rel_err(out, want) <= 1.5 * max_rel_err(theirs, want) + 1e-3


def test_timestep_forms(tiny_ref):
    m = UNet("tiny")
    m.load_state_dict(tiny_ref.state_dict())
    sample, _, ctx, pooled, ids = unet_inputs(tiny_config(), batch=2, h=16, w=16)
    want = _ours(m, (sample, torch.tensor([500.0, 500.0]), ctx, pooled, ids))
    for t in (500, 500.0, torch.tensor(500), torch.tensor([500])):
        assert torch.equal(_ours(m, (sample, t, ctx, pooled, ids)), want)
    assert torch.equal(want, diffusers_forward(tiny_ref, (sample, torch.tensor(500), ctx, pooled, ids)))


# --- bad input -------------------------------------------------------------------------------

def _write_sd(tmp_path, sd):
    folder = tmp_path / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_config()))
    save_tensors(folder / "diffusion_pytorch_model.safetensors", sd)
    return tmp_path


def test_missing_key_named(tmp_path, tiny_ref):
    sd = dict(tiny_ref.state_dict())
    del sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(WeightsError, match=r"1 missing key.*\n\s+mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight"):
        load_unet(_write_sd(tmp_path, sd))


def test_wrong_shape_named(tmp_path, tiny_ref):
    sd = dict(tiny_ref.state_dict())
    sd["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    with pytest.raises(WeightsError, match=r"shape mismatch.*\n\s+conv_in\.weight: file \(32, 5, 3, 3\) vs model \(32, 4, 3, 3\)"):
        load_unet(_write_sd(tmp_path, sd))


def test_wrong_config_for_the_file(tmp_path, tiny_ref):
    write_diffusers(tmp_path, tiny_ref)
    with pytest.raises(WeightsError, match="missing key"):
        load_unet(tmp_path, config=MID_CONFIG)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickles_refused_unless_allowed(tmp_path, tiny_ref, suffix):
    sgm = suffix == ".ckpt"  # .ckpt as the original single files were, .bin as old diffusers folders
    sd = to_sgm(tiny_ref.state_dict(), tiny_config()) if sgm else dict(tiny_ref.state_dict())
    if sgm:
        path = tmp_path / f"model{suffix}"
        torch.save({"state_dict": sd}, path)
        target = path
    else:
        folder = tmp_path / "unet"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(tiny_config()))
        torch.save(sd, folder / f"diffusion_pytorch_model{suffix}")
        target = tmp_path
    with pytest.raises(WeightsError, match="pickle.*allow_pickle=True"):
        load_unet(target, kind="tiny")
    m = load_unet(target, kind="tiny", allow_pickle=True)
    inputs = unet_inputs(tiny_config(), batch=2, h=16, w=16)
    assert_close_rel(_ours(m, inputs), diffusers_forward(tiny_ref, inputs), 1e-4)


def test_not_found_and_unsupported_config(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_unet(tmp_path / "nope")
    with pytest.raises(ValueError, match="use_linear_projection"):
        UNetConfig.from_diffusers({**SDXL_BASE_CONFIG, "use_linear_projection": False})
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNetConfig.preset("sd15")
