"""Full-size SDXL text encoders (random weights) against transformers and open_clip.

Slow (~7 GB of RAM, about a minute): ``flock /tmp/df-bigmem.lock pytest --runslow tests/parity/test_text_encoders_full_size_vs_transformers_open_clip.py``.
"""

import pytest
import torch
from torch import nn

from demofusion.text import CLIPTextConfig, CLIPTokenizer, load_text_encoder
from tests.helpers import assert_close_rel, save_tensors, seeded_init_
from tests.helpers.text import hf_outputs, hf_text_model, save_hf_text_model

pytestmark = pytest.mark.slow

PROMPTS = ["a photo of an astronaut riding a horse on mars", "Émoji 🤖!! café " * 30]


@pytest.mark.parametrize("name,encoder,variant", [("clip-l", 1, None), ("bigg", 2, "fp16")])
def test_full_size_matches_transformers(tmp_path, name, encoder, variant):
    pytest.importorskip("transformers")
    ref = hf_text_model(name, seed=1)
    save_hf_text_model(ref, tmp_path / f"text_encoder{'_2' if encoder == 2 else ''}", position_ids="int", variant=variant)
    if variant == "fp16":
        ref = ref.half().float()  # what the fp16 file holds
    ours = load_text_encoder(tmp_path, encoder, dtype="fp32")
    assert ours.config == CLIPTextConfig.preset(name)
    ids = CLIPTokenizer.from_open_clip(pad_token="!" if encoder == 2 else "<|endoftext|>")(PROMPTS)
    hs, last, pooled = hf_outputs(ref, ids)
    out = ours(ids)
    for i, (a, b) in enumerate(zip(out.hidden_states, hs)):
        assert_close_rel(a, b, what=f"{name} hidden state {i}")
    assert_close_rel(out.pooled, pooled, what=f"{name} pooled")


def test_full_bigg_open_clip_layout(tmp_path):
    pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32,
                            output_dim=1280, act_layer=nn.GELU)
    seeded_init_(tower, seed=2).eval()
    sd = {"conditioner.embedders.1.model." + k: v for k, v in tower.state_dict().items()}
    file = save_tensors(tmp_path / "sd_xl.safetensors", sd)
    del sd
    ours = load_text_encoder(file, 2)
    assert ours.config == CLIPTextConfig.preset("bigg")
    ids = CLIPTokenizer.from_open_clip(pad_token="!")(PROMPTS)
    with torch.no_grad():
        ref = tower.forward_intermediates(ids, output_fmt="NLC")
        out = ours(ids)
    assert_close_rel(out.hidden_states[-2], ref["text_intermediates"][-2], what="penultimate")
    assert_close_rel(out.pooled, ref["text_features"], what="pooled")
