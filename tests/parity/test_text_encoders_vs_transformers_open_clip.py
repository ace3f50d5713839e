"""Our CLIP text encoders equal transformers' / open_clip's on random weights, loaded from files."""

import warnings

import pytest
import torch

from demofusion.text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, TextEncoders, load_text_encoder, load_text_encoders
from demofusion.text.convert import from_open_clip, from_transformers
from demofusion.weights import WeightsError
from tests.helpers import assert_close_rel, save_tensors
from tests.helpers.text import (
    HF_TEXT, hf_outputs, hf_state_dict, hf_text_model, open_clip_reference, open_clip_text_tower,
    save_hf_text_model,
)

pytest.importorskip("transformers")

PROMPTS = ["a photo of an astronaut riding a horse", "", "Émoji 🤖!! 123 " * 4, "word " * 90]


def _ids(name, pad):
    tok = CLIPTokenizer.byte_level(pad_token=pad) if name.startswith("tiny") else CLIPTokenizer.from_open_clip(pad_token=pad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(PROMPTS)


def _compare(ours, ref, ids):
    hs, last, pooled = hf_outputs(ref, ids)
    with torch.no_grad():
        out = ours(ids)
    assert len(out.hidden_states) == len(hs) == ours.config.num_hidden_layers + 1
    errs = [assert_close_rel(a, b, what=f"hidden state {i}") for i, (a, b) in enumerate(zip(out.hidden_states, hs))]
    errs.append(assert_close_rel(out.last_hidden_state, last, what="last hidden state"))
    errs.append(assert_close_rel(out.pooled, pooled, what="pooled"))
    return max(errs)


# (preset, transformers overrides, keys prefixed with text_model.): tiny configs in both layouts,
# then real widths and vocabulary with fewer layers (encoder 1 as transformers 4.x wrote it,
# encoder 2 as transformers >= 5.6 writes it)
CASES = [
    ("tiny-l", {}, True), ("tiny-l", {}, False), ("tiny-g", {}, True), ("tiny-g", {}, False),
    ("clip-l", {"num_hidden_layers": 2}, True), ("bigg", {"num_hidden_layers": 2}, False),
]


@pytest.mark.parametrize("name,overrides,prefix", CASES, ids=[f"{c[0]}-{'prefix' if c[2] else 'noprefix'}" for c in CASES])
def test_matches_transformers_from_file(tmp_path, name, overrides, prefix):
    ref = hf_text_model(name, seed=3, **overrides)
    encoder = 2 if name in ("tiny-g", "bigg") else 1
    sub = "text_encoder_2" if encoder == 2 else "text_encoder"
    save_hf_text_model(ref, tmp_path / sub, prefix=prefix, position_ids="float" if prefix else "int")
    ours = load_text_encoder(tmp_path, encoder=encoder)
    assert ours.config == CLIPTextConfig.preset(name, **overrides)
    pad = "!" if encoder == 2 else "<|endoftext|>"
    err = _compare(ours, ref, _ids(name, pad))
    print(f"{name} prefix={prefix}: max|Δ|/max|ref| = {err:.2e}")


def test_fp16_variant_file(tmp_path):
    ref = hf_text_model("tiny-g", seed=5)
    save_hf_text_model(ref, tmp_path / "text_encoder_2", variant="fp16")
    assert load_text_encoder(tmp_path, 2).dtype == torch.float16  # the file's dtype by default
    ours = load_text_encoder(tmp_path, 2, dtype="fp32")
    _compare(ours, ref.half().float(), _ids("tiny-g", "!"))


def _single_file(tmp_path, hf_l, tower):
    sd = {"conditioner.embedders.0.transformer." + k: v for k, v in hf_state_dict(hf_l, prefix=True).items()}
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in tower.state_dict().items()})
    sd["model.diffusion_model.dummy.weight"] = torch.zeros(1)  # another component's key
    return save_tensors(tmp_path / "sd_xl_tiny.safetensors", sd)


def test_open_clip_layout_matches_open_clip_and_diffusers_converter(tmp_path):
    pytest.importorskip("open_clip")
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModelWithProjection

    tower = open_clip_text_tower(seed=7)  # width 128 (2 heads of 64), 3 layers, projection 128→96
    file = _single_file(tmp_path, hf_text_model("tiny-l", seed=8), tower)
    ours = load_text_encoder(file, encoder=2)
    assert ours.config == CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                         num_attention_heads=2, hidden_act="gelu", projection_dim=96)
    ids = _ids("tiny-g", "!")
    penult, pooled = open_clip_reference(tower, ids)
    with torch.no_grad():
        out = ours(ids)
    assert_close_rel(out.hidden_states[-2], penult, what="penultimate vs open_clip")
    assert_close_rel(out.pooled, pooled, what="pooled vs open_clip encode_text")

    # diffusers' own converter, loaded into transformers' model, agrees with ours
    ckpt = {"conditioner.embedders.1.model." + k: v for k, v in tower.state_dict().items()}
    cfg = HFConfig(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                   hidden_act="gelu", projection_dim=96, eos_token_id=2)
    ref = CLIPTextModelWithProjection(cfg)
    conv = convert_open_clip_checkpoint(ref, ckpt, prefix="conditioner.embedders.1.model.")
    missing, unexpected = ref.load_state_dict(conv, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    print(f"open_clip layout vs diffusers converter: {_compare(ours, ref.eval(), ids):.2e}")


def test_single_file_both_encoders(tmp_path):
    pytest.importorskip("open_clip")
    hf_l, tower = hf_text_model("tiny-l", seed=8), open_clip_text_tower(seed=7)
    file = _single_file(tmp_path, hf_l, tower)
    CLIPTokenizer.byte_level().save(tmp_path / "tok" / "tokenizer")
    CLIPTokenizer.byte_level(pad_token="!").save(tmp_path / "tok" / "tokenizer_2")
    text = load_text_encoders(file, tokenizer_path=tmp_path / "tok")
    assert text.force_zeros_for_empty_prompt and text.tokenizer_2.pad_id == 0
    _compare(text.text_encoder, hf_l, _ids("tiny-l", "<|endoftext|>"))
    embeds, pooled = text.encode(["a cat", "a dog"])
    assert embeds.shape == (2, 77, 32 + 128) and pooled.shape == (2, 96)
    # without tokenizer files the CLIP vocabulary (49408) comes from open_clip: too big for tiny weights
    with pytest.raises(ValueError, match="49408 tokens but text encoder 1 embeds only 1000"):
        load_text_encoders(file)


def test_real_configs_keys_and_shapes_match_transformers():
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFModel, CLIPTextModelWithProjection

    for name, cls in (("clip-l", HFModel), ("bigg", CLIPTextModelWithProjection)):
        with torch.device("meta"):
            ref = cls(HFConfig(**HF_TEXT[name]))
            ours = CLIPTextModel(CLIPTextConfig.preset(name))
        want = {k: tuple(v.shape) for k, v in from_transformers(ref.state_dict()).items()}
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert got == want, name
    assert sum(v.numel() for v in ours.state_dict().values()) == 694_659_840  # bigG text tower, as released


def test_real_bigg_open_clip_keys_map_onto_ours():
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    with torch.device("meta"):
        oc = CLIP(embed_dim=1280, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32))
        ours = CLIPTextModel(CLIPTextConfig.preset("bigg"))
    sd = {k: v for k, v in oc.state_dict().items() if not k.startswith("visual.")}
    mapped = {k: tuple(v.shape) for k, v in from_open_clip(sd).items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_wrong_weights_are_reported(tmp_path):
    ref = hf_text_model("tiny-l", seed=1)
    save_hf_text_model(ref, tmp_path / "text_encoder")
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_text_encoder(tmp_path, 1, config=CLIPTextConfig.preset("tiny-l", hidden_size=64, num_attention_heads=1))
    with pytest.raises(WeightsError, match="text_encoder_2"):
        load_text_encoder(tmp_path, 2)
    torch.save(hf_state_dict(ref), tmp_path / "clip_l.bin")
    with pytest.raises(WeightsError, match="pickle"):
        load_text_encoder(tmp_path / "clip_l.bin", 1)
    _compare(load_text_encoder(tmp_path / "clip_l.bin", 1, allow_pickle=True), ref, _ids("tiny-l", "<|endoftext|>"))


def test_preset_tiny_is_seeded_and_movable():
    a, b = TextEncoders.preset("tiny", seed=0), TextEncoders.preset("tiny", seed=0)
    ea, pa = a.encode("a cat")
    eb, pb = b.encode(["a cat"])
    assert ea.shape == (1, 77, 64) and pa.shape == (1, 32)
    assert torch.equal(ea, eb) and torch.equal(pa, pb)
    assert not torch.equal(ea, TextEncoders.preset("tiny", seed=1).encode("a cat")[0])
    half = a.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.encode("a cat")[0].dtype == torch.bfloat16
    assert a.to("cpu").device.type == "cpu"
