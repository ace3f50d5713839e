"""``DemoFusionPipeline.from_pretrained`` on one single-file (SGM) checkpoint, as users load
``sd_xl_turbo_1.0_fp16.safetensors``: every component from the one file, fp16 on disk, the
kind (and so the scheduler) from the file name, CLIP's vocabulary from open_clip (the file has
no tokenizer). The reference modules are diffusers' / transformers' / open_clip's, with the same
(fp16-rounded) weights; the file is written under the original names by our tests' own inverse
maps. The tiny UNet keeps SDXL's head dim (64), norm groups (32) and micro-conditioning width
(256), which a single file cannot state and the loader takes from the kind.
"""

import pytest
import torch

from demofusion.pipeline import DemoFusionPipeline
from demofusion.schedulers import EulerAncestralDiscreteScheduler
from tests.helpers import assert_close_rel, save_tensors
from tests.helpers.text import hf_outputs, hf_state_dict, hf_text_model, open_clip_reference, open_clip_text_tower
from tests.helpers.unet import SDXL_BASE_CONFIG, diffusers_forward, diffusers_unet, to_sgm, unet_inputs
from tests.helpers.vae import diffusers_vae, to_ldm

pytest.importorskip("open_clip")
pytest.importorskip("diffusers")

VOCAB = 49408  # CLIP's: the tokenizer comes from open_clip's shipped vocabulary
L_WIDTH, G_WIDTH, G_PROJ = 32, 128, 96
UNET_CONFIG = {
    **SDXL_BASE_CONFIG,
    "block_out_channels": [64, 128], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [1, 2],
    "transformer_layers_per_block": [1, 1], "layers_per_block": 1,
    "cross_attention_dim": L_WIDTH + G_WIDTH, "projection_class_embeddings_input_dim": G_PROJ + 6 * 256,
    "sample_size": 64,
}


def _fp16_rounded(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    unet = _fp16_rounded(diffusers_unet(UNET_CONFIG, seed=3))
    vae = _fp16_rounded(diffusers_vae("tiny", seed=4))
    clip_l = _fp16_rounded(hf_text_model("tiny-l", seed=5, vocab_size=VOCAB))
    bigg = _fp16_rounded(open_clip_text_tower(seed=6, width=G_WIDTH, proj=G_PROJ, vocab=VOCAB))
    sd = to_sgm(unet.state_dict(), UNET_CONFIG)
    sd.update({"first_stage_model." + k: v for k, v in to_ldm(vae.state_dict(), 4).items()})
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in hf_state_dict(clip_l).items()})
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in bigg.state_dict().items()})
    sd = {k: v.half() for k, v in sd.items()}
    file = save_tensors(tmp_path_factory.mktemp("ckpt") / "tiny_sdxl_turbo_fp16.safetensors", sd)
    pipe = DemoFusionPipeline.from_pretrained(file, dtype=torch.float32)
    return dict(pipe=pipe, unet=unet, vae=vae, clip_l=clip_l, bigg=bigg, file=file)


def test_kind_and_scheduler_come_from_the_file_name(checkpoint):
    pipe = checkpoint["pipe"]
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config["timestep_spacing"] == "trailing"
    assert pipe.base_size == 512  # Turbo's native size, from the kind
    assert pipe.unet.dtype == torch.float32


@pytest.mark.parity
def test_every_component_matches_its_reference(checkpoint):
    pipe = checkpoint["pipe"]
    inputs = unet_inputs(UNET_CONFIG, batch=2, h=16, w=24)
    with torch.no_grad():
        assert_close_rel(pipe.unet(*inputs), diffusers_forward(checkpoint["unet"], inputs), what="unet")
        z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
        assert_close_rel(pipe.vae.decode(z), checkpoint["vae"].decode(z).sample, what="vae decode")

        # Text: our tokenizer (open_clip's vocabulary) then both encoders, against transformers + open_clip.
        embeds, pooled = pipe.text.encode(["a lighthouse at dawn", "Ünïcode, punctuation!!"])
        ids1 = pipe.text.tokenizer(["a lighthouse at dawn", "Ünïcode, punctuation!!"])
        ids2 = pipe.text.tokenizer_2(["a lighthouse at dawn", "Ünïcode, punctuation!!"])
    assert ids1.max() < VOCAB and (ids1[:, 0] == 49406).all()  # <|startoftext|> of CLIP's vocab
    hidden_l = hf_outputs(checkpoint["clip_l"], ids1)[0][-2]
    penult_g, pooled_g = open_clip_reference(checkpoint["bigg"], ids2)
    assert_close_rel(embeds, torch.cat([hidden_l, penult_g], -1), what="prompt embeds")
    assert_close_rel(pooled, pooled_g, what="pooled")


def test_end_to_end_three_phases(checkpoint):
    pipe = checkpoint["pipe"]
    out = pipe("a lighthouse at dawn", height=256, width=384, num_inference_steps=2, guidance_scale=0.0,
               base_size=128, stride=8, seed=0, output_type="pil")
    assert len(out.images) == 3 and out.images[-1].size == (384, 256)  # PIL: (width, height)
    assert all(torch.isfinite(z).all() for z in out.latents)


def test_tokenizer_path_is_used(checkpoint, tmp_path):
    from demofusion.text import CLIPTokenizer

    CLIPTokenizer.byte_level().save(tmp_path / "tokenizer")
    CLIPTokenizer.byte_level(pad_token="!").save(tmp_path / "tokenizer_2")
    pipe = DemoFusionPipeline.from_pretrained(checkpoint["file"], tokenizer_path=tmp_path)
    assert len(pipe.text.tokenizer.encoder) == len(pipe.text.tokenizer_2.encoder) == 514
    assert pipe.text.tokenizer_2.pad_id == 0
