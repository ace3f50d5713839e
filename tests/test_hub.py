"""`demofusion download`: allow-patterns against the real repos' file lists (as data), clean offline failure."""

import os
import subprocess
import sys

import pytest
from huggingface_hub.utils import filter_repo_objects

from demofusion.hub import DownloadError, allow_patterns

_COMMON = ["model_index.json", "scheduler/scheduler_config.json",
           *[f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
             for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")]]
_DIFFUSERS = [f"{c}/{f}" for c, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                                          ("text_encoder", "model"), ("text_encoder_2", "model"))
              for f in ("config.json", f"{stem}.safetensors", f"{stem}.fp16.safetensors")]
# The repos' file lists (huggingface.co/<repo>/tree/main), written down so the test needs no network.
REPO_FILES = {
    "sdxl-base": [
        ".gitattributes", "01.png", "LICENSE.md", "README.md", "comparison.png", "pipeline.png",
        "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
        *_COMMON, *_DIFFUSERS,
        "text_encoder/flax_model.msgpack", "text_encoder/model.onnx", "text_encoder/openvino_model.bin",
        "text_encoder/openvino_model.xml", "text_encoder_2/flax_model.msgpack", "text_encoder_2/model.onnx",
        "text_encoder_2/model.onnx_data", "text_encoder_2/openvino_model.bin", "text_encoder_2/openvino_model.xml",
        "unet/diffusion_flax_model.msgpack", "unet/model.onnx", "unet/model.onnx_data", "unet/openvino_model.bin",
        "unet/openvino_model.xml", "vae/diffusion_flax_model.msgpack",
        "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
        "vae_decoder/config.json", "vae_decoder/model.onnx", "vae_decoder/openvino_model.bin", "vae_decoder/openvino_model.xml",
        "vae_encoder/config.json", "vae_encoder/model.onnx", "vae_encoder/openvino_model.bin", "vae_encoder/openvino_model.xml",
    ],
    "sdxl-turbo": [
        ".gitattributes", "LICENSE.md", "README.md", "image_quality_one_step.png", "output_tile.jpg",
        "prompt_alignment_one_step.png", "sd_xl_turbo_1.0.safetensors", "sd_xl_turbo_1.0_fp16.safetensors",
        *_COMMON, *_DIFFUSERS,
    ],
    "controlnet-canny-sdxl": [
        ".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
        "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors", "out_bird.png",
        "out_hug_lab_7.png", "out_realistic_1.png", "out_room.png", "out_tornado.png",
    ],
}


def selected(model, variant=None, single_file=False):
    pats = allow_patterns(model, variant, single_file)
    return pats, set(filter_repo_objects(REPO_FILES[model], allow_patterns=pats))


@pytest.mark.parametrize("model", ["sdxl-base", "sdxl-turbo"])
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_patterns_fetch_exactly_what_we_load(model, variant):
    pats, files = selected(model, variant)
    assert len(files) == len(pats) == 4 * 2 + 2 + 8  # every pattern names one existing file, nothing else
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    assert [w.split("/")[0] for w in weights] == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert all(w.endswith(suffix) and (variant or ".fp16." not in w) for w in weights)  # one precision only
    assert not any(f.endswith((".bin", ".ckpt", ".pt", ".onnx", ".onnx_data", ".msgpack", ".xml")) for f in files)
    assert not any(f.startswith(("vae_1_0/", "vae_decoder/", "vae_encoder/", "sd_xl")) for f in files)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert f"{comp}/config.json" in files
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer_2/vocab.json", "tokenizer/merges.txt"} <= files


@pytest.mark.parametrize("model,variant,want", [
    ("sdxl-base", None, "sd_xl_base_1.0.safetensors"), ("sdxl-turbo", None, "sd_xl_turbo_1.0.safetensors"),
    ("sdxl-turbo", "fp16", "sd_xl_turbo_1.0_fp16.safetensors")])
def test_single_file_pattern(model, variant, want):
    assert selected(model, variant, single_file=True)[1] == {want}


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_controlnet_patterns_fetch_its_config_and_one_weights_file(variant):
    pats, files = selected("controlnet-canny-sdxl", variant)
    want = "diffusion_pytorch_model.fp16.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    assert files == {"config.json", want} and len(pats) == 2
    with pytest.raises(DownloadError, match="no single-file checkpoint"):
        allow_patterns("controlnet-canny-sdxl", single_file=True)


def test_bad_arguments():
    with pytest.raises(DownloadError, match="unknown model"):
        allow_patterns("sd15")
    with pytest.raises(DownloadError, match="unknown variant"):
        allow_patterns("sdxl-base", "bf16")


def test_offline_fails_cleanly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "demofusion.cli", "download", "sdxl-turbo", "--dir", str(tmp_path / "w")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download stabilityai/sdxl-turbo"), r.stderr
    assert "HF_HUB_OFFLINE" in lines[0] and "`hf download stabilityai/sdxl-turbo" in lines[0]
    assert "unet/diffusion_pytorch_model.safetensors" in lines[0] and "weights/README.md" in lines[0]


def test_dir_that_is_a_file_is_said_before_any_network(tmp_path, capsys, monkeypatch):
    from demofusion.cli import main

    f = tmp_path / "weights"
    f.write_text("not a folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["download", "sdxl-turbo", "--dir", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --dir "), err
    assert "is a file, not a folder" in err[0] and "network" not in err[0] and "Traceback" not in "\n".join(err)
    assert f.read_text() == "not a folder"
