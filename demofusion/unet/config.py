"""UNet configuration: SDXL presets and reading a diffusers ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# Keys of a diffusers UNet2DConditionModel config that we read; others must keep their defaults.
_SUPPORTED_DEFAULTS = {
    "center_input_sample": False,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "mid_block_scale_factor": 1,
    "num_attention_heads": None,
    "time_embedding_dim": None,
    "downsample_padding": 1,
}


@dataclass(frozen=True)
class UNetConfig:
    """Shape of an SDXL-style UNet2DCondition network.

    ``attention_heads[i]`` is the number of heads at level ``i`` (head dim = channels / heads).
    This is what diffusers' config calls ``attention_head_dim`` (a historical misnomer).
    ``cross_attention[i]`` says whether level ``i`` has transformer blocks.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280)
    cross_attention: tuple = (False, True, True)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple = (1, 2, 10)
    attention_heads: tuple = (5, 10, 20)
    cross_attention_dim: int = 2048
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 128

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        """``sdxl-base`` (sample_size 128), ``sdxl-turbo`` (same network, 64) or ``tiny``."""
        presets = {
            "sdxl-base": cls(),
            "sdxl-turbo": cls(sample_size=64),
            "tiny": cls(
                block_out_channels=(32, 64), cross_attention=(False, True),
                layers_per_block=1, transformer_layers_per_block=(1, 1), attention_heads=(2, 4),
                cross_attention_dim=64, addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, sample_size=32,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Read a diffusers ``UNet2DConditionModel`` config dict (as in ``unet/config.json``)."""
        for k, default in _SUPPORTED_DEFAULTS.items():
            v = cfg.get(k, default)
            if isinstance(v, (list, tuple)) and k == "only_cross_attention":
                v = any(v)
            if default is False and v is None:
                v = False
            if v != default:
                raise ValueError(
                    f"unsupported UNet config: {k}={v!r} (SDXL uses {default!r}); "
                    "only SDXL-style UNets are implemented."
                )
        if cfg.get("addition_embed_type") != "text_time":
            raise ValueError("unsupported UNet config: addition_embed_type must be 'text_time' (SDXL).")
        if not cfg.get("use_linear_projection", False):
            raise ValueError("unsupported UNet config: use_linear_projection must be true (SDXL).")
        down = list(cfg["down_block_types"])
        n = len(down)
        for i, (d, u) in enumerate(zip(down, reversed(cfg["up_block_types"]))):
            if d not in ("DownBlock2D", "CrossAttnDownBlock2D") or u != d.replace("Down", "Up"):
                raise ValueError(f"unsupported block types at level {i}: {d} / {u}")

        def per_level(v):
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n

        layers = cfg.get("layers_per_block", 2)
        if isinstance(layers, (list, tuple)):
            if len(set(layers)) != 1:
                raise ValueError("unsupported UNet config: layers_per_block must be the same at every level")
            layers = layers[0]
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg["block_out_channels"]),
            cross_attention=tuple(d.startswith("CrossAttn") for d in down),
            layers_per_block=int(layers),
            transformer_layers_per_block=per_level(cfg.get("transformer_layers_per_block", 1)),
            attention_heads=per_level(cfg.get("attention_head_dim", 8)),
            cross_attention_dim=cfg["cross_attention_dim"],
            addition_time_embed_dim=cfg["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"],
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            sample_size=cfg.get("sample_size", 128),
        )

    def to_diffusers(self) -> dict:
        """The equivalent diffusers ``UNet2DConditionModel`` config (for tests and saving)."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention]
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": down,
            "up_block_types": [d.replace("Down", "Up") for d in reversed(down)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "attention_head_dim": list(self.attention_heads),
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        }

    def replace(self, **kw) -> "UNetConfig":
        return replace(self, **kw)

    def as_dict(self) -> dict:
        return asdict(self)
