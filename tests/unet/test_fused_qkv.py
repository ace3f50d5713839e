"""Fused self-attention projections (``UNet.fuse_qkv``): one GEMM for q, k and v.

Checked on the tiny UNet in fp32 (CPU): fused outputs equal unfused ones to GEMM rounding
(max|Δ|/max|ref| ≤ 1e-6); only self-attentions fuse; ``state_dict`` keeps every key, in order,
with the same values; unfusing gives back the weights and outputs bit for bit; loading and
saving state dicts while fused; LoRAs fused before, during and after fusing give the same
weights, and unload exactly; fp8 projections are never fused and fp8 conversion of a fused model
is refused; the pipeline's placement copes with modules fused away between runs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from demofusion.fp8 import to_fp8_
from demofusion.lora import LoRA, LoraStack
from demofusion.lora.formats import LoraTarget
from demofusion.presets import tiny_components
from demofusion.unet import UNet
from demofusion.unet.attention import Attention
from tests.helpers import max_rel_err

TOL = 1e-6  # fused vs unfused outputs, max|Δ|/max|ref|, fp32: one GEMM against three


def _unet(seed: int = 0) -> UNet:
    return tiny_components(seed=seed)[0]


def _inputs(unet: UNet, seed: int = 1):
    c = unet.config
    g = torch.Generator().manual_seed(seed)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return (torch.randn(2, c.in_channels, 16, 16, generator=g), torch.tensor([500.0, 20.0]),
            torch.randn(2, 77, c.cross_attention_dim, generator=g), torch.randn(2, pooled, generator=g),
            torch.rand(2, 6, generator=g) * 1024)


def _out(unet: UNet, args) -> torch.Tensor:
    with torch.no_grad():
        return unet(*args)


def _copy(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def test_fused_outputs_equal_unfused_to_gemm_rounding_and_unfuse_is_exact():
    unet = _unet()
    args = _inputs(unet)
    want, before = _out(unet, args), _copy(unet.state_dict())
    attn1 = [m for n, m in unet.named_modules() if n.endswith(".attn1")]
    assert unet.fuse_qkv() == len(attn1) > 0
    assert all(m.fused for m in attn1)
    assert not any(m.fused for n, m in unet.named_modules() if n.endswith(".attn2"))  # cross: context ≠ x
    assert not any(n.endswith((".attn1.to_q", ".attn1.to_k", ".attn1.to_v")) for n, _ in unet.named_modules())
    got = _out(unet, args)
    assert max_rel_err(got, want) <= TOL
    sd = unet.state_dict()
    assert list(sd) == list(before)  # every key, in the same order
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    assert unet.fuse_qkv() == len(attn1)  # fusing again changes nothing
    assert unet.unfuse_qkv() == len(attn1) and unet.unfuse_qkv() == 0
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), before.values()))
    assert [n for n, _ in unet.named_parameters()] == list(before)
    assert torch.equal(_out(unet, args), want)


def test_one_fused_attention_is_one_linear_with_the_rows_stacked():
    attn = Attention(8, 2, 4)
    q, k, v = (p.weight.detach().clone() for p in (attn.to_q, attn.to_k, attn.to_v))
    attn.fuse_qkv()
    assert isinstance(attn.to_qkv, torch.nn.Linear) and attn.to_qkv.bias is None
    assert torch.equal(attn.to_qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(attn.projection_weight("to_k"), k) and attn.projection_weight("to_out") is None
    cross = Attention(8, 2, 4, context_dim=6)
    assert cross.fuse_qkv() is False and not cross.fused and cross.projection_weight("to_q") is None


def test_state_dict_loads_into_a_fused_unet_and_saves_as_safetensors(tmp_path):
    src, dst = _unet(seed=3), _unet(seed=4)
    dst.fuse_qkv()
    assert dst.load_state_dict(src.state_dict(), strict=True)  # no missing, no unexpected keys
    assert dst.fuse_qkv() and all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(),
                                                                    src.state_dict().values()))
    save_file({k: v.contiguous() for k, v in dst.state_dict().items()}, str(tmp_path / "u.safetensors"))
    fresh = _unet(seed=5)
    fresh.load_state_dict(load_file(str(tmp_path / "u.safetensors")))
    args = _inputs(src)
    assert torch.equal(_out(fresh, args), _out(src, args))


def _lora(unet: UNet, seed: int = 7) -> LoRA:
    """Rank-2 updates of q, k, v (self- and cross-attention) and to_out of every transformer block."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for name, m in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                w = unet.get_submodule(f"{name}.{proj}").weight
                targets.append(LoraTarget("unet", f"{name}.{proj}", torch.randn(2, w.shape[1], generator=g),
                                          torch.randn(w.shape[0], 2, generator=g) * 0.1, alpha=1.0))
    return LoRA(targets, name="qkv")


def test_loras_fuse_into_fused_projections_and_unload_exactly():
    plain, fused_first, fused_after = _unet(), _unet(), _unet()
    original = _copy(plain.state_dict())
    lora = _lora(plain)
    stacks = [LoraStack() for _ in range(3)]
    stacks[0].load({"unet": plain}, lora, 0.8)
    fused_first.fuse_qkv()
    stacks[1].load({"unet": fused_first}, lora, 0.8)  # written through the fused rows
    stacks[2].load({"unet": fused_after}, lora, 0.8)
    fused_after.fuse_qkv()
    want = plain.state_dict()
    for unet in (fused_first, fused_after):
        assert all(torch.equal(a, want[k]) for k, a in unet.state_dict().items())
        assert max_rel_err(_out(unet, _inputs(unet)), _out(plain, _inputs(plain))) <= TOL
    stacks[2].unload({"unet": fused_after})  # loaded unfused, unloaded fused
    fused_first.unfuse_qkv()
    stacks[1].unload({"unet": fused_first})  # loaded fused, unloaded unfused
    for unet in (fused_after, fused_first):
        assert all(torch.equal(a, original[k]) for k, a in unet.state_dict().items())


def test_fp8_projections_stay_apart_and_fp8_conversion_of_fused_is_refused():
    unet = _unet()
    args = _inputs(unet)
    to_fp8_(unet)
    want = _out(unet, args)
    assert unet.fuse_qkv() == 0 and torch.equal(_out(unet, args), want)
    fused = _unet()
    fused.fuse_qkv()
    with pytest.raises(ValueError, match="unfuse_qkv") as e:
        to_fp8_(fused)
    assert "\n" not in str(e.value)


def test_offloaded_pipeline_runs_the_same_after_fusing_between_runs():
    """Under offload="model" the components wait at home between runs; fusing then replaces
    modules whose ids the placement recorded: the next run must move the fused weights (not
    stale entries) and give the unfused run's latents to GEMM rounding; the entries of the
    modules fused away are dropped, and unfusing gives the first run's latents bit for bit."""
    from tests.helpers.pipeline import small_pipeline

    pipe = small_pipeline("sdxl")
    kw = dict(prompt="a castle", height=256, width=256, num_inference_steps=2, seed=3, stride=8,
              output_type="latent", offload="model")
    want = pipe(**kw).latents
    pipe.unet.fuse_qkv()
    alive = {id(m) for m in pipe.unet.modules()} | {id(m) for c in pipe.placement.components.values()
                                                  for x in c for m in x.modules()}
    assert {i for i, _ in pipe.placement._home} <= alive
    got = pipe(**kw).latents
    assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(got, want))
    assert pipe.placement.at_home(pipe.unet)
    pipe.unet.unfuse_qkv()
    assert all(torch.equal(a, b) for a, b in zip(pipe(**kw).latents, want))


def test_compile_fuses_on_request(tmp_path):
    """``compile(fuse_qkv=True)`` fuses (on CUDA it is the default); state_dict keys unchanged and
    save_pretrained writes the unfused layout."""
    from tests.helpers.pipeline import small_pipeline

    pipe = small_pipeline("sdxl")
    keys = list(pipe.unet.state_dict())
    pipe.compile(backend="aot_eager", fuse_qkv=True)
    assert any(isinstance(m, Attention) and m.fused for m in pipe.unet.modules())
    assert list(pipe.unet.state_dict()) == keys
    pipe.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))) == set(keys)
