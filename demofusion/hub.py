"""`demofusion download`: fetch only the files we load, through huggingface_hub."""

from __future__ import annotations

from pathlib import Path

from .errors import first_line

REPOS = {"sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl-turbo": "stabilityai/sdxl-turbo",
         "controlnet-canny-sdxl": "diffusers/controlnet-canny-sdxl-1.0",  # ControlNets: config + one weights file
         "controlnet-canny-sdxl-mid": "diffusers/controlnet-canny-sdxl-1.0-mid",
         "controlnet-canny-sdxl-small": "diffusers/controlnet-canny-sdxl-1.0-small"}
SINGLE_FILES = {  # (repo file for fp32, for fp16) of the one-file SGM checkpoints
    "sdxl-base": ("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0.safetensors"),  # base ships one (fp16 data)
    "sdxl-turbo": ("sd_xl_turbo_1.0.safetensors", "sd_xl_turbo_1.0_fp16.safetensors"),
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


class DownloadError(RuntimeError):
    """A download that could not be done (offline, unknown model, hub error)."""


def allow_patterns(model: str, variant: str | None = None, single_file: bool = False) -> list[str]:
    """Exact repo paths to fetch: one safetensors per component in ``variant``, configs, tokenizers."""
    if model not in REPOS:
        raise DownloadError(f"unknown model {model!r}; choose one of {', '.join(REPOS)}")
    if variant not in (None, "fp16"):
        raise DownloadError(f"unknown variant {variant!r}; use --variant fp16 or leave it out (fp32)")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    if model.startswith("controlnet"):
        if single_file:
            raise DownloadError(f"{model} has no single-file checkpoint; leave out --single-file")
        return ["config.json", f"diffusion_pytorch_model{suffix}"]
    if single_file:
        return [SINGLE_FILES[model][variant == "fp16"]]
    files = ["model_index.json", "scheduler/scheduler_config.json"]
    for comp, stem in WEIGHT_FILES.items():
        files += [f"{comp}/config.json", f"{comp}/{stem}{suffix}"]
    for tok in ("tokenizer", "tokenizer_2"):
        files += [f"{tok}/{name}" for name in TOKENIZER_FILES]
    return files


def manual_instructions(model: str, target: Path, variant: str | None = None) -> str:
    repo = REPOS.get(model, "stabilityai/stable-diffusion-xl-base-1.0")
    files = " ".join(allow_patterns(model, variant)) if model in REPOS else "..."
    return (f"download these files of https://huggingface.co/{repo} by hand (browser or "
            f"`hf download {repo} {files} --local-dir {target}`) into {target}/, "
            "keeping the folder layout (see weights/README.md)")


def check_target(folder: Path, target: Path) -> None:
    """The download folder is a folder (or can become one): said before any network access, so a
    file given as --dir is not reported as a network error."""
    for p in (folder, target, *folder.parents):
        if p.exists() and not p.is_dir():
            raise DownloadError(f"--dir {folder}: {p} is a file, not a folder; give a folder for the weights "
                                "(e.g. --dir weights)")


def download(model: str, folder: str | Path = "weights", variant: str | None = None,
             single_file: bool = False) -> Path:
    """Download ``model`` into ``folder/<model>`` and return that path; DownloadError on failure."""
    patterns = allow_patterns(model, variant, single_file)
    target = Path(folder).expanduser() / model
    check_target(Path(folder).expanduser(), target)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(REPOS[model], allow_patterns=patterns, local_dir=str(target))
    except Exception as e:  # offline, HTTP errors, disk full … all get the same plain advice
        reason = f"{type(e).__name__}: {first_line(e)}"
        raise DownloadError(f"could not download {REPOS[model]} ({reason}). Check the network "
                            f"(HF_HUB_OFFLINE must be unset), or {manual_instructions(model, target, variant)}") from e
    return target / patterns[0] if single_file else target
