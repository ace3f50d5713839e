"""`demofusion inspect`: layouts, kinds and key checks of tiny random checkpoints, from headers only."""

import pytest
import torch
from safetensors.torch import save_file

from demofusion.cli import main
from demofusion.inspection import inspect, read_header
from demofusion.pipeline import DemoFusionPipeline
from demofusion.unet import load_unet
from demofusion.weights import WeightsError
from tests.helpers.unet import to_sgm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = DemoFusionPipeline.from_pretrained("tiny")
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp("tiny") / "tiny-model")


def test_header_matches_tensors(tiny):
    pipe, folder = tiny
    head = read_header(folder / "unet" / "diffusion_pytorch_model.safetensors")
    sd = pipe.unet.state_dict()
    assert set(head) == set(sd)
    assert all(head[k] == ("F32", list(v.shape)) for k, v in sd.items())


def test_diffusers_folder(tiny, capsys):
    pipe, folder = tiny
    rep = inspect(folder)
    assert rep.layout == "diffusers folder"
    assert [c.name for c in rep.components] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text.text_encoder,
               "text_encoder_2": pipe.text.text_encoder_2}
    for c in rep.components:
        assert c.params == sum(p.numel() for p in modules[c.name].state_dict().values()), c.name
        assert c.dtypes == {"F32": len(modules[c.name].state_dict())} or c.name.startswith("text"), c.name
        assert c.missing == [] and c.unexpected == [], (c.name, c.missing, c.unexpected)
    assert "tiny" in rep.kind
    assert rep.ok and rep.problems() == [] and all(c.ok and c.mismatched == [] for c in rep.components)
    assert main(["inspect", str(folder)]) == 0
    assert "keys match the model exactly" in capsys.readouterr().out


def test_component_folder_and_file_with_bad_keys(tiny, tmp_path):
    pipe, folder = tiny
    rep = inspect(folder / "vae")
    assert rep.layout == "component folder (vae)" and rep.components[0].missing == []
    sd = {k: v for k, v in pipe.unet.state_dict().items() if k != "conv_in.bias"}
    sd["extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "unet.safetensors"))
    (tmp_path / "config.json").write_text((folder / "unet" / "config.json").read_text())
    rep = inspect(tmp_path / "unet.safetensors")
    c = rep.components[0]
    assert c.name == "unet" and c.missing == ["conv_in.bias"] and c.unexpected == ["extra.weight"]
    assert not rep.ok and "keys match the model exactly" not in rep.text()
    with pytest.raises(WeightsError) as err:
        load_unet(tmp_path / "unet.safetensors")
    assert rep.problems() == [str(err.value).splitlines()[0]]  # the loader's words


def test_shape_mismatch_and_truncation_are_reported_as_loading_reports_them(tiny, tmp_path):
    pipe, folder = tiny
    sd = dict(pipe.unet.state_dict())
    sd["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    (tmp_path / "unet").mkdir()
    save_file(sd, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
    rep = inspect(tmp_path / "unet")
    c = rep.components[0]
    assert c.missing == [] and c.unexpected == []
    assert c.mismatched == ["conv_in.weight: file (32, 5, 3, 3) vs model (32, 4, 3, 3)"]
    with pytest.raises(WeightsError) as err:
        load_unet(tmp_path)
    first = str(err.value).splitlines()[0]
    assert first.startswith(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors") + ": the weights do not fit")
    assert not rep.ok and rep.problems() == [first]
    # the same file cut short by a byte: integrity first (as the loader), the key check still shown
    f = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    rep = inspect(f)
    with pytest.raises(WeightsError) as err:
        load_unet(f)
    assert "truncated: the file has" in str(err.value).splitlines()[0]
    assert rep.problems() == [str(err.value).splitlines()[0], first]


def test_single_file(tiny, tmp_path):
    pipe, folder = tiny
    unet_sd = {k: v.half() for k, v in pipe.unet.state_dict().items()}
    sd = to_sgm(unet_sd, pipe.unet.config.to_diffusers())
    sd.update({"first_stage_model." + k: v for k, v in pipe.vae.state_dict().items()})
    save_file(sd, str(tmp_path / "my_sdxl_turbo.safetensors"))
    rep = inspect(tmp_path / "my_sdxl_turbo.safetensors")
    assert rep.layout == "single-file (SGM) checkpoint" and rep.kind == "sdxl-turbo"
    unet, vae, *absent = rep.components
    assert unet.name == "unet" and unet.dtypes == {"F16": len(unet_sd)}
    assert unet.params == sum(v.numel() for v in unet_sd.values())
    assert unet.missing == [] and unet.unexpected == [], (unet.missing, unet.unexpected, unet.note)
    assert vae.name == "vae" and vae.missing == [] and vae.unexpected == []
    assert unet.ok and vae.ok
    # no text encoders: generate cannot load it (load_text_encoders refuses), so inspect is not clean
    assert [c.name for c in absent] == ["text_encoder", "text_encoder_2"] and not rep.ok
    assert "no text encoder 1 in this checkpoint" in rep.problems()[0]


def test_generate_from_a_model_folder(tiny, tmp_path, capsys):
    pipe, folder = tiny
    assert main(["generate", "--model", str(folder), "--height", "256", "--width", "256", "--steps", "2",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    from demofusion.cli import read_png_params

    meta = read_png_params(tmp_path / "phase_1.png")
    assert meta["model"] == str(folder) and len(meta["model_hash"]) == 16


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert "demofusion download" in capsys.readouterr().err
    (tmp_path / "m.ckpt").write_bytes(b"x")
    assert main(["inspect", str(tmp_path / "m.ckpt")]) == 2
    assert "pickles are never opened" in capsys.readouterr().err
