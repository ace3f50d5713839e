"""TextEncoders.encode equals diffusers' StableDiffusionXLPipeline.encode_prompt (tiny components)."""

import warnings

import pytest
import torch

from demofusion.text import TextEncoders, load_text_encoders
from tests.helpers import assert_close_rel
from tests.helpers.text import hf_tokenizer, write_tiny_text_folder

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

LONG = "Émoji 🤖!! & café, highly detailed " * 12  # > 77 tokens: truncated by both


@pytest.fixture(scope="module", params=[True, False], ids=["force_zeros", "no_force_zeros"])
def pair(request, tmp_path_factory):
    """(ours, diffusers pipeline) built from the same tiny folder (no UNet/VAE needed)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    root, e1, e2, t1, t2 = write_tiny_text_folder(tmp_path_factory.mktemp("sdxl"), seed=11, force_zeros=request.param)
    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, text_encoder=e1, text_encoder_2=e2, tokenizer=t1, tokenizer_2=t2,
        scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=request.param,
    )
    ours = load_text_encoders(root)
    assert ours.force_zeros_for_empty_prompt is request.param  # read from model_index.json
    return ours, pipe


CASES = {
    "no-negative": dict(prompt=["a photo of a cat", LONG]),
    "negative": dict(prompt=["a photo of a cat", LONG], negative_prompt=["blurry", "low quality, ugly!!"]),
    "prompt_2": dict(prompt="a cat", prompt_2="A DOG, oil painting", negative_prompt="blurry", negative_prompt_2="grainy"),
    "empty-negative": dict(prompt="a cat", negative_prompt=""),
    "no-guidance": dict(prompt=["a cat", "a dog"], guidance=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_matches_diffusers_encode_prompt(pair, case):
    ours, pipe = pair
    kw = dict(CASES[case])
    guidance = kw.pop("guidance", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pipe.encode_prompt(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=guidance, **kw)
        got = ours.encode_with_negative(guidance=guidance, **kw)
        plain = ours.encode(kw["prompt"], kw.get("prompt_2"))
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled"]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        if not b.abs().max():  # force_zeros_for_empty_prompt: exact zeros
            assert not a.abs().max(), name
        else:
            assert_close_rel(a, b, what=name)
    assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[2])
    if case == "no-negative" and pipe.config.force_zeros_for_empty_prompt:
        assert not got[1].abs().max() and not got[3].abs().max()


def test_prompt_2_count_must_match(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="prompt_2"):
        ours.encode(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="negative_prompt"):
        ours.encode_with_negative(["a", "b"], negative_prompt=["c"])


def test_preset_saved_in_diffusers_layout_runs_in_diffusers(tmp_path):
    """TextEncoders.save writes files transformers/diffusers load; their encode_prompt equals ours."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ours = TextEncoders.preset("tiny", seed=3)
    ours.save(tmp_path)
    e1 = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    e2 = CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder_2")
    t1, t2 = hf_tokenizer(tmp_path / "tokenizer"), hf_tokenizer(tmp_path / "tokenizer_2")
    assert t2.pad_token_id == 0
    pipe = StableDiffusionXLPipeline(vae=None, unet=None, text_encoder=e1, text_encoder_2=e2, tokenizer=t1,
                                     tokenizer_2=t2, scheduler=EulerDiscreteScheduler())
    prompts = ["a photo of a cat!!", LONG]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=["blurry", ""])
        got = ours.encode_with_negative(prompts, negative_prompt=["blurry", ""])
        reloaded = load_text_encoders(tmp_path).encode(prompts)
    for a, b in zip(got, want):
        assert_close_rel(a, b)
    assert torch.equal(reloaded[0], got[0]) and torch.equal(reloaded[1], got[2])
