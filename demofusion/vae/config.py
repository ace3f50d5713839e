"""Configuration of SDXL's AutoencoderKL (diffusers' ``vae/config.json`` fields we use)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class VAEConfig:
    """The architecture numbers of an SDXL-style KL autoencoder.

    ``block_out_channels`` gives one encoder level per entry (the decoder mirrors it); every
    level but the last halves (encoder) / doubles (decoder) the resolution, so the pixel/latent
    scale factor is ``2 ** (len(block_out_channels) - 1)`` (8 for SDXL).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.13025
    sample_size: int = 1024  # the pixel size the VAE is used at natively
    force_upcast: bool = True  # the model's own statement that it overflows in fp16
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # config.json fields we do not use

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}; "
                "choose block_out_channels that are multiples of the group count."
            )

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        """``"sdxl"`` (the released SDXL VAE) or ``"tiny"`` (4 small levels, for tests/offline)."""
        presets = {
            "sdxl": dict(),
            "sdxl-fp16-fix": dict(force_upcast=False),
            "tiny": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=256),
        }
        if name not in presets:
            raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """Read a diffusers ``AutoencoderKL`` config.json dict (SDXL's down/up block types only)."""
        down = cfg.get("down_block_types", ["DownEncoderBlock2D"])
        up = cfg.get("up_block_types", ["UpDecoderBlock2D"])
        if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"}:
            raise ValueError(
                f"unsupported VAE blocks {down} / {up}: only SDXL's DownEncoderBlock2D/UpDecoderBlock2D "
                "autoencoder is implemented."
            )
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported VAE act_fn {cfg['act_fn']!r}; SDXL's VAE uses 'silu'.")
        if cfg.get("latents_mean") is not None or cfg.get("shift_factor") not in (None, 0, 0.0):
            raise ValueError("this VAE config uses latents_mean/shift_factor (not an SDXL VAE); unsupported.")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in cfg.items() if k in names and v is not None}
        extra = {k: v for k, v in cfg.items() if k not in names}
        return cls(**kw, extra=extra)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["block_out_channels"] = list(self.block_out_channels)
        return d
