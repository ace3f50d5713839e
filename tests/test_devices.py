"""`device="auto"` / `--device auto` and the dtype that goes with it."""

import pytest
import torch

from demofusion.cli import main
from demofusion.devices import default_dtype, resolve_device
from demofusion.errors import InputError


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match="banana"):
        resolve_device("banana")
    with pytest.raises(InputError, match="only cpu, cuda and mps"):
        resolve_device("meta")


def test_dtype_follows_the_device():
    assert default_dtype("cuda") == default_dtype("mps") == torch.float16
    assert default_dtype("cpu") == torch.float32


def test_from_pretrained_defaults_to_auto():
    from demofusion import DemoFusionPipeline

    pipe = DemoFusionPipeline.from_pretrained("tiny")  # no GPU here: cpu, fp32
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32


def test_cli_says_device_and_dtype_first(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--height", "256", "--width", "256", "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "tiny on cpu in float32" in first
