"""CLIP text transformer (pre-LN, causal), named as transformers' CLIPTextModel.

Used twice by SDXL: CLIP ViT-L/14 (12 layers, width 768, quick-GELU) and OpenCLIP ViT-bigG/14
(32 layers, width 1280, GELU, a bias-free 1280→1280 ``text_projection``). Parameter names
are transformers' (without the ``text_model.`` prefix) so diffusers-layout files load as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..tensors import DtypeDevice


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set: the model has ``text_projection`` (encoder 2)

    @classmethod
    def preset(cls, name: str, **overrides) -> "CLIPTextConfig":
        """``clip-l`` (SDXL encoder 1), ``bigg`` (encoder 2), ``tiny-l``, ``tiny-g``."""
        try:
            cfg = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown text encoder preset {name!r}; use one of {sorted(PRESETS)}") from None
        return replace(cfg, **overrides)

    @classmethod
    def from_transformers(cls, d: dict, with_projection: bool | None = None) -> "CLIPTextConfig":
        """From a transformers ``config.json`` of CLIPTextModel[WithProjection].

        ``projection_dim`` is kept only for the with-projection model (SDXL's encoder-1 config
        also lists one, unused); pass ``with_projection`` to decide from the weights instead.
        """
        if with_projection is None:
            with_projection = any("WithProjection" in a for a in d.get("architectures") or [])
        names = {f.name for f in fields(cls)} - {"projection_dim"}
        kw = {k: d[k] for k in names if k in d}
        return cls(**kw, projection_dim=d.get("projection_dim", kw.get("hidden_size", 768)) if with_projection else None)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_transformers(self) -> dict:
        """A transformers ``config.json`` for this model (SDXL's token ids: eos 2 → argmax pooling)."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        arch = "CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"
        return {"architectures": [arch], "model_type": "clip_text_model", **d,
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


PRESETS = {
    "clip-l": CLIPTextConfig(),
    "bigg": CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280,
    ),
    "tiny-l": CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    ),
    "tiny-g": CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="gelu", projection_dim=32,
    ),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # x·σ(1.702x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t):  # [B, N, D] -> [B, heads, N, D/heads]
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # softmax(q kᵀ / √d_head + causal mask) v
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; use one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # x + Attn(LN(x))
        return x + self.mlp(self.layer_norm2(x))  # x + MLP(LN(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, N, D], after final_layer_norm
    pooled: torch.Tensor  # [B, D] or [B, P]: eot token of last_hidden_state (projected if encoder 2)
    hidden_states: tuple  # (embeddings, layer 1, …, layer L) — before final_layer_norm


class CLIPTextModel(DtypeDevice, nn.Module):
    """Token ids ``[B, N]`` → :class:`CLIPTextOutput` (hidden states of every layer, pooled)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.projection_dim:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def _reference_weight(self) -> torch.Tensor:  # .dtype / .device
        return self.final_layer_norm.weight

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{input_ids.shape[-1]} tokens but the model has {self.config.max_position_embeddings} "
                "positions; tokenize with truncation (CLIPTokenizer does)."
            )
        x = self.embeddings(input_ids)
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = self.final_layer_norm(x)
        # the end-of-text token is the largest id in CLIP's vocabulary: take the first argmax
        eot = input_ids.argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eot]
        if self.config.projection_dim:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(last, pooled, tuple(hidden))
