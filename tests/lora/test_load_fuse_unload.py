"""LoRAs (demofusion/lora): both layouts against diffusers + PEFT, exact unloading, errors.

Parity: tiny SDXL-like diffusers/transformers components (tests/helpers/reference.py) saved as a
diffusers folder and loaded into our modules; random LoRA files in each layout, every rank and
alpha varied per layer; diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` on the
reference vs ``LoraStack.load(…, scale=s)`` on ours. Compared: UNet outputs, every hidden state
and the pooled output of both text encoders (max|Δ|/max|ref| ≤ 1e-4), and every weight; the
set of weights each side changed must be exactly the LoRA's targets (so diffusers used every key).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from demofusion.errors import InputError
from demofusion.lora import LoRA, LoraError, LoraStack, fuse_lora, read_lora
from demofusion.lora.formats import kohya_module
from demofusion.text.encoders import load_text_encoder
from demofusion.unet import load_unet
from tests.helpers import max_rel_err
from tests.helpers import reference as R
from tests.helpers import unet as U

TOL = 1e-4  # outputs, max|Δ| / max|ref|, fp32
WEIGHT_TOL = 1e-5  # fused weights, same measure per tensor
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SKIPPED_UNET = ("conv_in", "conv_out", "time_embedding.", "add_embedding.")  # kohya's LoCon leaves these


# ---------------------------------------------------------------- models ----------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The reference tiny SDXL-like components, saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    R.save_folder(R.tiny_components(seed=0), folder)
    return folder


# SDXL's block structure (3 levels, 2 layers, attention in levels 2 and 3, depth 2 in the last),
# as MID_CONFIG, narrower: what kohya's SGM names (input_blocks.4.1 …) index.
SDXL_SHAPED = {**U.MID_CONFIG, "block_out_channels": [32, 32, 64], "attention_head_dim": [1, 1, 2],
               "cross_attention_dim": 32}


@pytest.fixture(scope="module")
def sdxl_shaped(tiny, tmp_path_factory):
    """The tiny folder with an SDXL-shaped UNet instead."""
    folder = tmp_path_factory.mktemp("sdxl_shaped") / "model"
    shutil.copytree(tiny, folder)
    shutil.rmtree(folder / "unet")
    U.write_diffusers(folder, U.diffusers_unet(SDXL_SHAPED, seed=3))
    return folder


def ours(folder) -> dict:
    """Our three modules, freshly loaded from a diffusers folder (fp32, CPU)."""
    return {"unet": load_unet(folder, dtype=torch.float32),
            "text_encoder": load_text_encoder(folder, 1, dtype=torch.float32),
            "text_encoder_2": load_text_encoder(folder, 2, dtype=torch.float32)}


def reference(folder):
    """A diffusers SDXL pipeline around the folder's components (fresh, fp32, CPU)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from demofusion.schedulers.config import SDXL_BASE_CONFIG

    tok1, tok2 = R.hf_tokenizers(folder)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer=tok1, tokenizer_2=tok2, unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_BASE_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights(modules: dict, clone: bool = True) -> dict:
    """Every tensor of the three modules (our names): copies, or (``clone=False``) views that
    follow later changes."""
    return {(c, k): v.detach().clone() if clone else v.detach()
            for c in COMPONENTS for k, v in modules[c].state_dict().items()}


def reference_weights(pipe) -> dict:
    """The reference's tensors under our names (views)."""
    return {(c, k.removeprefix("text_model.")): v.detach()
            for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


# ---------------------------------------------------------------- random LoRAs ----------------
def lora_targets(modules: dict) -> list[tuple[str, str, torch.Size]]:
    """(component, module, weight shape) of what kohya's LoCon trains: every Linear/Conv2d of the
    UNet but the outermost layers (convs 3×3 and 1×1 included), the text encoders' attention and MLP."""
    out = []
    for c in COMPONENTS:
        for name, m in modules[c].named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if c == "unet" and not name.startswith(SKIPPED_UNET) or c != "unet" and name.endswith(TEXT_LAYERS):
                out.append((c, name, m.weight.shape))
    return out


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SHARED_ALPHA = 3.0


def random_factors(targets, seed: int, components=COMPONENTS, magnitude: float = 0.5) -> list[dict]:
    """down [r, in(, kh, kw)], up [out, r(, 1, 1)] and alpha per target; ranks 1–4 per layer.

    Alphas differ from the ranks; they vary per layer except where diffusers 0.42 cannot follow
    kohya files: it keys the alphas of the UNet's attention projections and of the text encoders
    under names its PEFT ``alpha_pattern`` never matches, so those layers get the file's most
    common alpha. Here they share one (the most common: ``SHARED_ALPHA``; one per text encoder),
    as real kohya files do (one network alpha; LoCon convs may have their own ``conv_alpha``).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (c, name, shape) in enumerate(t for t in targets if t[0] in components):
        r = 1 + (i + seed) % 4
        down = torch.randn(r, *shape[1:], generator=g) / shape[1:].numel() ** 0.5
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g) * magnitude
        if c != "unet":
            alpha = SHARED_ALPHA + COMPONENTS.index(c)
        elif name.endswith(ATTENTION):
            alpha = SHARED_ALPHA
        else:
            alpha = 0.5 * r + 0.25 * (i % 5)
        out.append(dict(component=c, module=name, down=down, up=up, alpha=alpha))
    return out


def sgm_name(module: str) -> str:
    """Our UNet module path under its SGM (single-file) name, by our own map inverted."""
    key = next(iter(U.to_sgm({module + ".weight": None}, SDXL_SHAPED)))
    return key.removeprefix("model.diffusion_model.").removesuffix(".weight")


def write_kohya(path, factors, sgm: bool = False):
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    sd = {}
    for f in factors:
        module = sgm_name(f["module"]) if sgm and f["component"] == "unet" else f["module"]
        if f["component"] != "unet":
            module = "text_model." + module
        name = prefixes[f["component"]] + module.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = f["down"], f["up"]
        sd[f"{name}.alpha"] = torch.tensor(f["alpha"], dtype=torch.float16)
    save_file(sd, str(path))
    return path


def write_peft(path, factors, metadata: bool = True, text_model_prefix: bool = True):
    """diffusers / PEFT layout: lora_A / lora_B; alphas and ranks in diffusers' adapter metadata."""
    sd, meta = {}, {}
    for f in factors:
        c, module = f["component"], f["module"]
        prefix = f"{c}.text_model." if c != "unet" and text_model_prefix else f"{c}."
        sd[f"{prefix}{module}.lora_A.weight"], sd[f"{prefix}{module}.lora_B.weight"] = f["down"], f["up"]
    for c in {f["component"] for f in factors}:
        mine = [f for f in factors if f["component"] == c]
        r = max(f["down"].shape[0] for f in mine)
        meta |= {f"{c}.r": r, f"{c}.lora_alpha": 2.0, f"{c}.target_modules": [f["module"] for f in mine],
                 f"{c}.rank_pattern": {f["module"]: f["down"].shape[0] for f in mine if f["down"].shape[0] != r},
                 f"{c}.alpha_pattern": {f["module"]: f["alpha"] for f in mine if f["alpha"] != 2.0}}
    save_file(sd, str(path), {"format": "pt", "lora_adapter_metadata": json.dumps(meta)} if metadata else None)
    return path


def write_diffusers_old(path, factors, alpha: bool = False, prefix: str = "unet."):
    """The older diffusers layout, UNet only: lora.down / lora.up (``prefix=""``: a UNet-only file
    without the ``unet.`` prefix, which our reader takes but diffusers 0.42's pipeline ignores)."""
    sd = {}
    for f in factors:
        name = prefix + f["module"]
        sd[f"{name}.lora.down.weight"], sd[f"{name}.lora.up.weight"] = f["down"], f["up"]
        if alpha:
            sd[f"{name}.alpha"] = torch.tensor(f["alpha"])
    save_file(sd, str(path))
    return path


def expected_alpha(f, layout: str) -> float:
    """The alpha each layout's file carries for a factor set (None: alpha = rank)."""
    return {"kohya": f["alpha"], "peft": f["alpha"], "old": None}[layout]


def update64(f, alpha, scale: float) -> torch.Tensor:
    """scale · alpha/r · up @ down in float64, computed independently of the package."""
    r = f["down"].shape[0]
    delta = torch.einsum("or,ri...->oi...", f["up"].double().flatten(1), f["down"].double())
    return delta * (scale * (r if alpha is None else alpha) / r)


# ---------------------------------------------------------------- forward passes -------------
def text_ids(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, R.BOS, (2, 12), generator=g)
    ids[:, 0], ids[0, 7:], ids[1, 10:] = R.BOS, R.EOS, R.EOS  # eot: the largest id (our pooling), transformers' eos
    return ids


def our_outputs(modules: dict, unet_config: dict) -> dict:
    with torch.no_grad():
        out = {"unet": modules["unet"](*U.unet_inputs(unet_config, batch=2, h=8, w=8))}
        for c in ("text_encoder", "text_encoder_2"):
            o = modules[c](text_ids())
            out |= {(c, i): h for i, h in enumerate(o.hidden_states)}
            out |= {(c, "last"): o.last_hidden_state, (c, "pooled"): o.pooled}
    return out


def reference_outputs(pipe, unet_config: dict) -> dict:
    with torch.no_grad():
        out = {"unet": U.diffusers_forward(pipe.unet, U.unet_inputs(unet_config, batch=2, h=8, w=8))}
        for c in ("text_encoder", "text_encoder_2"):
            o = getattr(pipe, c)(text_ids(), output_hidden_states=True)
            out |= {(c, i): h for i, h in enumerate(o.hidden_states)}
            pooled = o.text_embeds if c == "text_encoder_2" else o.pooler_output
            out |= {(c, "last"): o.last_hidden_state, (c, "pooled"): pooled}
    return out


# ---------------------------------------------------------------- parity with diffusers ------
CASES = {
    # name: (folder fixture, writer, components, scale)
    "kohya": ("tiny", lambda p, f: write_kohya(p, f), COMPONENTS, 0.8),
    "kohya-sgm": ("sdxl_shaped", lambda p, f: write_kohya(p, f, sgm=True), ("unet",), 1.0),
    "peft": ("tiny", lambda p, f: write_peft(p, f), COMPONENTS, 1.3),
    "diffusers-old": ("tiny", lambda p, f: write_diffusers_old(p, f), ("unet",), 0.6),
}

@pytest.mark.parity
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case, request, tmp_path):
    """Ours = diffusers + PEFT, for each layout (alphas: see random_factors)."""
    fixture, write, components, scale = CASES[case]
    folder = request.getfixturevalue(fixture)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    mine = ours(folder)
    factors = random_factors(lora_targets(mine), seed=len(case), components=components)
    file = write(tmp_path / f"{case}.safetensors", factors)

    lora = read_lora(file)
    assert len(lora) == len(factors) and lora.components == set(components)
    layout = "old" if case == "diffusers-old" else case.split("-")[0]
    by_module = {(t.component, t.module): t for t in lora.targets}
    for f in factors:  # every key mapped to the module it was written for, with its alpha
        t = by_module[(f["component"], f["module"])]
        assert torch.equal(t.down, f["down"]) and torch.equal(t.up, f["up"])
        want = expected_alpha(f, layout)
        assert t.alpha is None if want is None else t.alpha == pytest.approx(want, rel=1e-3)

    pipe = reference(folder)
    before = our_outputs(mine, unet_config)
    w0 = weights(mine)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops PEFT's wrappers
    stack = LoraStack()
    stack.load(mine, file, scale=scale)

    # every weight as diffusers fused it; exactly the targets changed, on both sides
    targets = {(f["component"], f["module"] + ".weight") for f in factors}
    ref_w, our_w = reference_weights(pipe), weights(mine, clone=False)
    assert {k for k in our_w if not torch.equal(our_w[k], w0[k])} == targets
    assert {k for k in our_w if not torch.equal(ref_w[k], w0[k])} == targets
    werr = max(max_rel_err(our_w[k], ref_w[k]) for k in targets)
    assert werr <= WEIGHT_TOL, f"fused weights differ from diffusers': {werr:.2e}"

    ref, got = reference_outputs(pipe, unet_config), our_outputs(mine, unet_config)
    moves = []
    for k in got:  # what the LoRA targets moves a lot (the comparison is not vacuous), the rest not at all
        moved = max_rel_err(got[k], before[k])
        if (k if k == "unet" else k[0]) not in components:
            assert moved == 0, k
        elif k[1:] != (0,):  # (the embeddings, hidden state 0, have no LoRA)
            assert moved > 0.02, (k, moved)
            moves.append(moved)
    errs = {str(k): max_rel_err(got[k], ref[k]) for k in got}
    print(f"\n{case}: max output err {max(errs.values()):.2e}, max weight err {werr:.2e}, "
          f"outputs moved by the LoRA ≥ {min(moves):.2f}")
    assert max(errs.values()) <= TOL, {k: f"{v:.1e}" for k, v in errs.items() if v > TOL}

    stack.unload(mine)
    assert all(torch.equal(v, w0[k]) for k, v in weights(mine).items())


# ---------------------------------------------------------------- unloading, composing -------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unload_is_exact_and_loras_compose(tiny, tmp_path, dtype):
    mine = {c: m.to(dtype) for c, m in ours(tiny).items()}
    targets = lora_targets(mine)
    fa = random_factors(targets, seed=11)
    fb = random_factors(targets[::2], seed=12)  # B touches half of A's weights
    a = write_kohya(tmp_path / "a.safetensors", fa)
    b = write_peft(tmp_path / "b.safetensors", fb)
    params = {(c, k): p for c in COMPONENTS for k, p in mine[c].named_parameters()}
    w0 = weights(mine)

    stack = LoraStack()
    assert stack.load(mine, a, scale=0.7) == "a"
    assert stack.load(mine, read_lora(b), scale=-0.4) == "b"
    assert stack.loaded == {"a": 0.7, "b": -0.4}
    both = weights(mine)
    if dtype == torch.float32:  # A + B = W + ΔA + ΔB
        for f_list, scale, layout in ((fa, 0.7, "kohya"), (fb, -0.4, "peft")):
            for f in f_list:
                key = (f["component"], f["module"] + ".weight")
                w0[key + ("Δ",)] = w0.get(key + ("Δ",), 0) + update64(f, expected_alpha(f, layout), scale)
        for key in both:
            want = w0[key].double() + w0.get(key + ("Δ",), 0)
            assert max_rel_err(both[key], want) <= 1e-6, key
        w0 = {k: v for k, v in w0.items() if len(k) == 2}

    stack.unload(mine, "a")
    only_b = weights(mine)
    assert stack.loaded == {"b": -0.4}
    stack.unload(mine)
    assert stack.loaded == {}
    assert all(torch.equal(v, w0[k]) for k, v in weights(mine).items()), "unload all: not the original weights"
    fresh = LoraStack()
    fresh.load(mine, b, scale=-0.4)
    assert all(torch.equal(v, only_b[k]) for k, v in weights(mine).items()), "A unloaded != only B loaded"
    assert any(not torch.equal(v, w0[k]) for k, v in only_b.items())
    fresh.unload(mine, "b")
    assert all(torch.equal(v, w0[k]) for k, v in weights(mine).items())
    # the same Parameter objects throughout (others hold references to them)
    assert all(p is params[(c, k)] for c in COMPONENTS for k, p in mine[c].named_parameters())


def test_fuse_lora_and_same_name_twice(tiny, tmp_path):
    mine = ours(tiny)
    factors = random_factors(lora_targets(mine), seed=2, components=("text_encoder_2",))
    file = write_kohya(tmp_path / "te2.safetensors", factors)
    w0 = weights(mine)
    fuse_lora(mine, read_lora(file), 0.5)
    for f in factors:
        key = ("text_encoder_2", f["module"] + ".weight")
        want = w0[key].double() + update64(f, f["alpha"], 0.5)
        assert max_rel_err(mine["text_encoder_2"].state_dict()[key[1]], want) <= 1e-6
    stack = LoraStack()
    assert [stack.load(mine, file), stack.load(mine, file)] == ["te2", "te2-2"]
    with pytest.raises(LoraError, match="already loaded"):
        stack.load(mine, file, name="te2")
    with pytest.raises(LoraError, match="no LoRA named 'nope'"):
        stack.unload(mine, "nope")


def test_alpha_key_in_diffusers_layout_equals_metadata_alpha(tiny, tmp_path):
    mine = ours(tiny)
    factors = random_factors(lora_targets(mine), seed=4, components=("unet",))
    with_alpha = read_lora(write_diffusers_old(tmp_path / "old.safetensors", factors, alpha=True, prefix=""))
    with_meta = read_lora(write_peft(tmp_path / "peft.safetensors", factors))
    without = read_lora(write_peft(tmp_path / "plain.safetensors", factors, metadata=False))
    for x, y, z in zip(with_alpha.targets, with_meta.targets, without.targets):
        assert x.module == y.module == z.module and x.alpha == pytest.approx(y.alpha) and z.alpha is None
    w = {}
    for name, lora in (("alpha", with_alpha), ("meta", with_meta)):
        stack = LoraStack()
        stack.load(mine, lora)
        w[name] = weights(mine)
        stack.unload(mine)
    assert all(torch.equal(w["alpha"][k], w["meta"][k]) for k in w["alpha"])


def test_older_diffusers_names(tiny, tmp_path):
    """Attention-processor names (diffusers ≤ 0.20), lora_linear_layer, PEFT's base_model.model."""
    mine = ours(tiny)
    factors = [f for f in random_factors(lora_targets(mine), seed=6)
               if f["module"].endswith(ATTENTION + TEXT_LAYERS)]
    old, peft_unet = {}, {}
    for f in factors:
        c, module = f["component"], f["module"]
        if c == "unet":
            parent, _, leaf = module.removesuffix(".0").rpartition(".")
            name = f"unet.{parent}.processor.{leaf}_lora"
            peft_unet[f"base_model.model.{module}.lora_A.weight"] = f["down"]
            peft_unet[f"base_model.model.{module}.lora_B.weight"] = f["up"]
        elif module.endswith(("fc1", "fc2")):
            name = f"{c}.text_model.{module}.lora_linear_layer"
        else:
            parent, _, leaf = module.rpartition(".")
            name = f"{c}.text_model.{parent}.to_{leaf.removesuffix('_proj')}_lora"
        old[f"{name}.down.weight"], old[f"{name}.up.weight"] = f["down"], f["up"]
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(peft_unet, str(tmp_path / "peft_unet.safetensors"))
    want = {(f["component"], f["module"]): f for f in factors}
    for file, n in (("old.safetensors", len(factors)), ("peft_unet.safetensors", len(peft_unet) // 2)):
        lora = read_lora(tmp_path / file)
        assert len(lora) == n
        for t in lora.targets:
            f = want[(t.component, t.module)]
            assert torch.equal(t.down, f["down"]) and torch.equal(t.up, f["up"]) and t.alpha is None
    msg = error(LoraStack().load, {"unet": mine["unet"]}, tmp_path / "old.safetensors")
    assert "12 targets in text_encoder but no text_encoder module was given" in msg


def test_kohya_names_resolve_to_our_modules():
    """Underscore-joined names split into our modules' words (fewest pieces), SGM names renamed."""
    cases = {
        ("unet", "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_out_0"):
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
        ("unet", "mid_block_attentions_0_proj_out"): "mid_block.attentions.0.proj_out",
        ("unet", "input_blocks_4_1_proj_in"): "down_blocks.1.attentions.0.proj_in",
        ("unet", "input_blocks_1_0_in_layers_2"): "down_blocks.0.resnets.0.conv1",
        ("unet", "input_blocks_3_0_op"): "down_blocks.0.downsamplers.0.conv",
        ("unet", "middle_block_2_emb_layers_1"): "mid_block.resnets.1.time_emb_proj",
        ("unet", "output_blocks_2_2_conv"): "up_blocks.0.upsamplers.0.conv",
        ("unet", "output_blocks_3_0_skip_connection"): "up_blocks.1.resnets.0.conv_shortcut",
        ("unet", "output_blocks_8_0_out_layers_3"): "up_blocks.2.resnets.2.conv2",
        ("unet", "up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj"):
            "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
        ("text_encoder", "text_model_encoder_layers_11_self_attn_out_proj"): "encoder.layers.11.self_attn.out_proj",
        ("text_encoder_2", "text_model_encoder_layers_0_mlp_fc2"): "encoder.layers.0.mlp.fc2",
    }
    for (component, flat), want in cases.items():
        assert kohya_module(component, flat) == (want, ""), flat
    assert kohya_module("unet", "down_blocks_1_attentions_0_foo_bar")[0] is None
    assert kohya_module("text_encoder", "text_model_encoder_layers_0_self_attn_to_q")[0] is None


# ---------------------------------------------------------------- errors ---------------------
def error(fn, *args, **kwargs) -> str:
    with pytest.raises(LoraError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, InputError)
    return msg


def small_lora(mine, seed=0, **kw) -> list[dict]:
    return random_factors(lora_targets(mine)[:6], seed=seed, **kw)


def test_sd15_loras_are_named(tiny, tmp_path):
    mine = ours(tiny)
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    save_file(te, str(tmp_path / "sd15_te.safetensors"))
    msg = error(read_lora, tmp_path / "sd15_te.safetensors")
    assert "SD 1.5" in msg and "SDXL LoRAs are needed" in msg and "sd15_te.safetensors" in msg

    # UNet blocks SDXL does not have (attention in the first level)
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{path}.lora_A.weight": torch.zeros(4, 32), f"{path}.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "sd15_blocks.safetensors"))
    msg = error(LoraStack().load, mine, tmp_path / "sd15_blocks.safetensors")
    assert "SD 1.5" in msg and "down_blocks.0.attentions.0" in msg

    # 768-wide cross-attention (SD 1.5's CLIP-L context) on a module SDXL has
    path = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{path}.lora_A.weight": torch.zeros(4, 768), f"{path}.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "sd15_width.safetensors"))
    msg = error(LoraStack().load, mine, tmp_path / "sd15_width.safetensors")
    assert "SD 1.5" in msg and "768" in msg


def test_truncated_and_pickled_files(tiny, tmp_path):
    mine = ours(tiny)
    file = write_kohya(tmp_path / "good.safetensors", small_lora(mine))
    data = file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    msg = error(read_lora, tmp_path / "cut.safetensors")
    assert "cut.safetensors" in msg and "truncated" in msg
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "junk.safetensors" in error(read_lora, tmp_path / "junk.safetensors")
    assert "does not exist" in error(read_lora, tmp_path / "missing.safetensors")

    from safetensors.torch import load_file

    torch.save(load_file(str(file)), tmp_path / "old.ckpt")
    msg = error(read_lora, tmp_path / "old.ckpt")
    assert "old.ckpt" in msg and "pickle" in msg and "allow_pickle=True" in msg and ".safetensors" in msg
    pickled = read_lora(tmp_path / "old.ckpt", allow_pickle=True)  # trusted: read as any other
    assert [t.module for t in pickled.targets] == [t.module for t in read_lora(file).targets]


def test_unknown_keys_and_modules(tiny, tmp_path):
    mine = ours(tiny)
    factors = small_lora(mine)
    from safetensors.torch import load_file

    sd = load_file(str(write_kohya(tmp_path / "k.safetensors", factors)))
    extra = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a"
    save_file({**sd, extra: torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    msg = error(read_lora, tmp_path / "loha.safetensors")
    assert extra in msg and f"1 of {len(sd) + 1} keys" in msg

    bad = {**sd, "lora_unet_down_blocks_1_attentions_0_whatever_to_q.lora_down.weight": torch.zeros(2, 2)}
    save_file(bad, str(tmp_path / "name.safetensors"))
    assert "whatever" in error(read_lora, tmp_path / "name.safetensors")

    path = "unet.up_blocks.7.attentions.0.proj_in"  # a well-formed name that is not in this model
    save_file({f"{path}.lora_A.weight": torch.zeros(2, 64), f"{path}.lora_B.weight": torch.zeros(64, 2)},
              str(tmp_path / "absent.safetensors"))
    msg = error(LoraStack().load, mine, tmp_path / "absent.safetensors")
    assert "1 of 1 LoRA targets" in msg and "up_blocks.7" in msg

    half = {k: v for k, v in sd.items() if not k.endswith("lora_up.weight")}
    save_file(half, str(tmp_path / "half.safetensors"))
    msg = error(read_lora, tmp_path / "half.safetensors")
    assert f"{len(factors)} modules have only part" in msg


def test_shape_mismatch_changes_nothing(tiny, tmp_path):
    mine = ours(tiny)
    factors = small_lora(mine)
    factors[-1]["down"] = torch.zeros(factors[-1]["down"].shape[0], 7, *factors[-1]["down"].shape[2:])
    file = write_kohya(tmp_path / "shape.safetensors", factors)
    w0 = weights(mine)
    stack = LoraStack()
    msg = error(stack.load, mine, file)
    name = "lora_unet_" + factors[-1]["module"].replace(".", "_")
    assert "1 of 6 LoRA targets do not fit" in msg and name in msg
    assert all(torch.equal(v, w0[k]) for k, v in weights(mine).items()) and stack.loaded == {}


def test_fp8_weights_are_refused(tiny, tmp_path):
    from demofusion.fp8 import to_fp8_

    mine = ours(tiny)
    file = write_kohya(tmp_path / "f.safetensors", small_lora(mine, components=("unet",)))
    stack = LoraStack()
    stack.load(mine, file)
    to_fp8_(mine["unet"])
    assert "before fp8" in error(stack.unload, mine)
    assert "load LoRAs before fp8" in error(LoraStack().load, mine, file)


def test_lora_object_and_folder(tiny, tmp_path):
    mine = ours(tiny)
    (tmp_path / "repo").mkdir()
    write_peft(tmp_path / "repo" / "pytorch_lora_weights.safetensors", small_lora(mine))
    lora = read_lora(tmp_path / "repo")
    assert isinstance(lora, LoRA) and lora.layout == "diffusers" and len(lora) == 6
    assert "6 targets" in repr(lora)
