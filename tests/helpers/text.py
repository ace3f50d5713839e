"""Text-encoder test factories: CLIP vocab files, reference tokenizers and encoders, layouts.

Everything is built offline: the vocabulary comes from the BPE file open_clip ships, models
are transformers / open_clip modules in small configs filled by ``seeded_init_``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from tests.helpers import save_tensors, seeded_init_


def write_clip_vocab(folder, pad_token="<|endoftext|>") -> Path:
    """vocab.json + merges.txt built from open_clip's bpe file, as SDXL's tokenizer folders are."""
    import open_clip.tokenizer as oct

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    syms = list(oct.bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return _write(folder, {t: i for i, t in enumerate(vocab)}, merges, pad_token)


def write_byte_vocab(folder, pad_token="<|endoftext|>") -> Path:
    """The merge-free byte vocabulary (512 byte symbols, sot 512, eot 513), written independently."""
    import open_clip.tokenizer as oct

    syms = list(oct.bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"]
    return _write(folder, {t: i for i, t in enumerate(vocab)}, [], pad_token)


def _write(folder, vocab, merges, pad_token) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def hf_tokenizer(folder, pad_token=None):
    """transformers' CLIPTokenizer from a vocab folder (pad token as the folder says unless given)."""
    from transformers import CLIPTokenizer

    kw = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer.from_pretrained(str(folder), **kw)


def hf_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ---- reference encoders -------------------------------------------------------------------
# transformers' kwargs for our presets; SDXL's released configs use eos_token_id 2, which makes
# transformers pool at the argmax of the ids (as SDXL's original code does).
HF_TEXT = {
    "tiny-l": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, hidden_act="quick_gelu"),
    "tiny-g": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, hidden_act="gelu", projection_dim=32),
    "clip-l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    "bigg": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
}
WITH_PROJECTION = {"tiny-l": False, "tiny-g": True, "clip-l": False, "bigg": True}


def hf_text_model(name, seed=0, **overrides):
    """transformers CLIPTextModel / CLIPTextModelWithProjection for a preset, seeded weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kw = {**HF_TEXT[name], **overrides}
    cfg = CLIPTextConfig(**kw, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    cls = CLIPTextModelWithProjection if WITH_PROJECTION[name] else CLIPTextModel
    return seeded_init_(cls(cfg), seed).eval()


def hf_state_dict(model, prefix=True):
    """The model's tensors with (transformers 4.x files) or without (≥ 5.6) ``text_model.``."""
    out = {}
    for k, v in model.state_dict().items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        if prefix and not k.startswith("text_projection"):
            k = "text_model." + k
        out[k] = v
    return out


def save_hf_text_model(model, folder, prefix=True, position_ids=None, variant=None):
    """Write config.json + model[.variant].safetensors; ``position_ids``: None, "int" or "float"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    sd = hf_state_dict(model, prefix)
    if variant == "fp16":
        sd = {k: v.half() for k, v in sd.items()}
    if position_ids:
        pos = torch.arange(77)[None]
        sd[("text_model." if prefix else "") + "embeddings.position_ids"] = pos.float() if position_ids == "float" else pos
    save_tensors(folder / (f"model.{variant}.safetensors" if variant else "model.safetensors"), sd)
    return folder


def hf_outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states, out.last_hidden_state, pooled


def write_tiny_text_folder(root, seed=0, force_zeros=True, prefix=True):
    """A diffusers-layout folder with tiny text encoders and byte-level tokenizers.

    Returns ``(root, hf_encoder_1, hf_encoder_2, hf_tokenizer_1, hf_tokenizer_2)``.
    """
    root = Path(root)
    enc1, enc2 = hf_text_model("tiny-l", seed), hf_text_model("tiny-g", seed + 1)
    save_hf_text_model(enc1, root / "text_encoder", prefix=prefix, position_ids="int")
    save_hf_text_model(enc2, root / "text_encoder_2", prefix=prefix)
    write_byte_vocab(root / "tokenizer")
    write_byte_vocab(root / "tokenizer_2", pad_token="!")
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": force_zeros}
    (root / "model_index.json").write_text(json.dumps(index))
    return root, enc1, enc2, hf_tokenizer(root / "tokenizer"), hf_tokenizer(root / "tokenizer_2")


def open_clip_text_tower(seed=0, width=128, heads=2, layers=3, proj=96, vocab=1000):
    """An open_clip CLIP (GELU, bigG-like text tower in small sizes) with its visual tower removed."""
    from open_clip.model import CLIP

    vision = dict(image_size=32, layers=1, width=64, head_width=32, patch_size=16)
    text = dict(context_length=77, vocab_size=vocab, width=width, heads=heads, layers=layers)
    model = CLIP(embed_dim=proj, vision_cfg=vision, text_cfg=text, quick_gelu=False)
    del model.visual  # as SDXL's FrozenOpenCLIPEmbedder2 does: its checkpoint has no visual keys
    return seeded_init_(model, seed).eval()


def open_clip_reference(model, ids):
    """(penultimate hidden state, projected pooled) through open_clip's own code paths."""
    with torch.no_grad():
        out = model.forward_intermediates(text=ids, normalize=False)
        return out["text_intermediates"][-2], model.encode_text(ids)
