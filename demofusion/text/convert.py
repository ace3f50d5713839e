"""Key maps from the released text-encoder layouts to ours (transformers names, no prefix).

* transformers / diffusers: ``[text_model.]embeddings.…``, ``text_projection.weight`` —
  the prefix is dropped; ``embeddings.position_ids`` (a buffer, sometimes stored as floats)
  is ignored.
* open_clip (SDXL single file, ``conditioner.embedders.1.model.``): fused attention
  ``in_proj_weight``/``in_proj_bias`` are split into q, k, v; ``text_projection`` is stored
  ``[width, proj]`` and applied as ``x @ P``, i.e. a Linear with weight ``Pᵀ``;
  ``logit_scale`` is ignored.
"""

from __future__ import annotations

import re

import torch

from .clip import CLIPTextConfig

IGNORED = ("embeddings.position_ids", "logit_scale")

# open_clip sub-module names → transformers' (inside one residual block)
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_FUSED = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def is_open_clip_layout(keys) -> bool:
    return any(k.startswith("transformer.resblocks.") for k in keys)


def from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel[WithProjection] keys (with or without ``text_model.``) → ours."""
    out = {}
    for k, v in sd.items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        if k not in IGNORED:
            out[k] = v
    return out


def from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip text tower's tensors (prefix already stripped) → our names."""
    out, unknown = {}, []
    for k, v in sd.items():
        if k in IGNORED or k == "attn_mask":
            continue
        if k in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[k]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()  # x @ P == Linear(weight=Pᵀ)
        elif m := _FUSED.match(k):
            i, kind = m.groups()
            for name, part in zip("qkv", v.chunk(3, dim=0)):  # rows: [W_q; W_k; W_v]
                out[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif (m := _BLOCK.match(k)) and m.group(2) in _OPEN_CLIP_BLOCK:
            i, sub, kind = m.groups()
            out[f"encoder.layers.{i}.{_OPEN_CLIP_BLOCK[sub]}.{kind}"] = v
        else:
            unknown.append(k)
    out.update({f"<unknown open_clip key> {k}": sd[k] for k in unknown})  # reported by the checker
    return out


def infer_config(sd: dict[str, torch.Tensor], encoder: int) -> CLIPTextConfig:
    """A config from our-named tensors (single files have no config.json).

    What the tensors do not say follows SDXL's conventions: encoder 1 uses quick-GELU,
    encoder 2 GELU; heads are ``width / 64`` (tiny widths below 64: ``width / 8``).
    """
    vocab, width = sd["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    proj = sd.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=width // 64 if width >= 64 else max(1, width // 8),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if encoder == 1 else "gelu",
        projection_dim=None if proj is None else proj.shape[0],
    )
