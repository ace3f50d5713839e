"""Damaged weights: every loader and `demofusion inspect` refuse them with the same one-line error.

A tiny diffusers folder is written once; each case damages a copy (a truncated, emptied,
random or corrupt-header safetensors file, a garbage config.json, a directory where a file
belongs, tensors of the wrong shape) and checks that

* the component's loader and ``DemoFusionPipeline.from_pretrained`` raise a ``WeightsError``
  (an ``InputError``, a ``ValueError``) whose first line names the damaged file and the issue;
* ``inspect()`` of the folder (and of the damaged path) is not ok and lists that same line;
* ``demofusion inspect`` exits 2 and prints no traceback.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from demofusion.errors import InputError
from demofusion.inspection import inspect
from demofusion.pipeline import DemoFusionPipeline
from demofusion.text import load_text_encoder, load_text_encoders
from demofusion.unet import load_unet
from demofusion.vae import load_vae
from demofusion.weights import WeightsError
from tests.helpers.unet import to_sgm

WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors",
           "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder_2": "text_encoder_2/model.safetensors"}
LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder_2": load_text_encoders}  # given the model folder
COMPONENT_LOADERS = {**LOADERS, "text_encoder_2": lambda p: load_text_encoder(p, 2)}  # given its folder / file


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    pipe = DemoFusionPipeline.from_pretrained("tiny")
    return pipe, pipe.save_pretrained(tmp_path_factory.mktemp("pristine") / "tiny-model")


@pytest.fixture
def model(pristine, tmp_path):
    """A fresh copy of the tiny diffusers folder, to damage."""
    return shutil.copytree(pristine[1], tmp_path / "model")


# ---- ways to damage a file ------------------------------------------------------------------

def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


def truncate(keep):
    def damage(f):
        data = f.read_bytes()
        f.write_bytes(data[:keep(len(data))])
    return damage


def replace_bytes(make):
    def damage(f):
        f.write_bytes(make(f.read_bytes()))
    return damage


def random_bytes(f):
    f.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8).numpy().tobytes())


def header_length(value):
    return replace_bytes(lambda d: struct.pack("<Q", value(d)) + d[8:])


def same_size_header(raw: bytes):
    """Overwrite the JSON header with ``raw`` padded to its length (the length field stays right)."""
    def make(d):
        (n,) = struct.unpack("<Q", d[:8])
        return d[:8] + raw.ljust(n)[:n] + d[8 + n:]
    return replace_bytes(make)


def edit_header(edit):
    def make(d):
        header, body = _split(d)
        edit(header)
        return _join(header, body)
    return replace_bytes(make)


def shrink_shape(header):  # conv_in.weight claims one element: its byte span no longer fits
    header["conv_in.weight"]["shape"] = [1]


def overlap(header):  # two tensors share bytes
    header["conv_in.bias"]["data_offsets"] = list(header["conv_in.weight"]["data_offsets"])


def as_directory(f):
    f.unlink()
    f.mkdir()
    (f / "stray.txt").write_text("not weights")


def resave(edit):
    def damage(f):
        sd = load_file(str(f))
        edit(sd)
        save_file(sd, str(f))
    return damage


def wrong_shape(sd):
    w = sd["conv_in.weight"]
    sd["conv_in.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1, *w.shape[2:])


def wrong_vae_shape(sd):
    sd["decoder.conv_out.bias"] = torch.zeros(7)


def missing_and_extra(sd):
    del sd["conv_in.bias"]
    sd["extra.weight"] = torch.zeros(3)


def config_text(text: str):
    def damage(f):
        f.write_text(text)
    return damage


def config_edit(**changes):
    def damage(f):
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return damage


# (id, component, damaged file ("weights" or "config"), damage, what the first line must say)
CASES = [
    ("truncated-by-1-byte", "unet", "weights", truncate(lambda n: n - 1), "truncated: the file has"),
    ("truncated-to-half", "unet", "weights", truncate(lambda n: n // 2), "truncated: the file has"),
    ("truncated-to-8-bytes", "unet", "weights", truncate(lambda n: 8), "truncated: the file has 8 bytes"),
    ("truncated-to-5-bytes", "unet", "weights", truncate(lambda n: 5), "needs at least 8"),
    ("zero-bytes", "unet", "weights", truncate(lambda n: 0), "empty file (0 bytes)"),
    ("random-bytes", "unet", "weights", random_bytes, "not a safetensors file (header unreadable"),
    ("header-length-past-end", "unet", "weights", header_length(lambda d: len(d)), "truncated: the file has"),
    ("header-length-huge", "unet", "weights", header_length(lambda d: 2 ** 40), "not a safetensors file"),
    ("header-invalid-json", "unet", "weights", same_size_header(b'{"conv_in.weight": {'), "invalid JSON"),
    ("header-not-utf8", "unet", "weights", same_size_header(b"{\xff\xfe}"), "not UTF-8"),
    ("header-json-array", "unet", "weights", same_size_header(b"[]"), "a JSON array, not an object"),
    ("header-shape-vs-bytes", "unet", "weights", edit_header(shrink_shape), "corrupt header: tensor 'conv_in.weight'"),
    ("header-offsets-overlap", "unet", "weights", edit_header(overlap), "corrupt header"),
    ("trailing-bytes", "unet", "weights", replace_bytes(lambda d: d + b"\0" * 16), "16 bytes too many"),
    ("weights-file-is-a-directory", "unet", "weights", as_directory, "is a directory"),
    ("wrong-shape", "unet", "weights", resave(wrong_shape), "the weights do not fit the UNet: 1 shape mismatch"),
    ("missing-and-unexpected", "unet", "weights", resave(missing_and_extra), "1 missing key (conv_in.bias)"),
    ("config-not-json", "unet", "config", config_text("garbage {"), "not valid JSON"),
    ("config-empty", "unet", "config", config_text(""), "not valid JSON"),
    ("config-json-array", "unet", "config", config_text("[1, 2]"), "holds a JSON array, not an object"),
    ("config-wrong-type", "unet", "config", config_edit(block_out_channels="abc"), "'block_out_channels' is \"abc\""),
    ("config-wrong-type-2", "unet", "config", config_edit(layers_per_block="two"), "'layers_per_block' is"),
    ("config-unbuildable", "unet", "config", config_edit(norm_num_groups=7), "does not describe a loadable UNet"),
    ("config-unsupported", "unet", "config", config_edit(act_fn="gelu"), "does not describe a loadable UNet"),
    ("config-missing-field", "unet", "config", config_text('{"down_block_types": ["DownBlock2D"], '
                                                          '"addition_embed_type": "text_time", '
                                                          '"use_linear_projection": true}'),
     "does not describe a loadable UNet"),
    ("config-is-a-directory", "unet", "config", as_directory, "is a directory"),
    ("vae-truncated", "vae", "weights", truncate(lambda n: n - 100), "truncated: the file has"),
    ("vae-wrong-shape", "vae", "weights", resave(wrong_vae_shape), "the weights do not fit the VAE"),
    ("vae-config-wrong-type", "vae", "config", config_edit(latent_channels=[4]), "'latent_channels' is [4]"),
    ("text-encoder-2-random", "text_encoder_2", "weights", random_bytes, "not a safetensors file"),
    ("text-encoder-2-config-garbage", "text_encoder_2", "config", config_edit(hidden_size="wide"),
     "'hidden_size' is \"wide\""),
]


def _damaged(model, component, which):
    f = model / WEIGHTS[component]
    return f if which == "weights" else f.parent / "config.json"


def _error_line(load, path) -> str:
    with pytest.raises(WeightsError) as info:
        load(path)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)
    assert info.value.__cause__ is None or isinstance(info.value.__cause__, WeightsError)
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("component, which, damage, says",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loaders_and_inspect_refuse_damaged_weights(model, component, which, damage, says):
    bad = _damaged(model, component, which)
    damage(bad)
    line = _error_line(LOADERS[component], model)
    assert str(bad) in line and says in line, line
    assert line.endswith(("re-download it", "re-download it)", "fix it or re-download it")) or \
        "the weights do not fit" in line, line
    # the pipeline, the component's folder and the damaged file itself give the same first line
    assert _error_line(DemoFusionPipeline.from_pretrained, model) == line
    for target in (bad.parent, bad) if which == "weights" else (bad.parent,):
        assert _error_line(COMPONENT_LOADERS[component], target) == line
    # inspect: not ok, and the same words, from the model folder and from the damaged path
    for target in (model, bad.parent, bad) if which == "weights" else (model, bad.parent):
        report = inspect(target)
        assert not report.ok
        assert line in report.problems(), (target, report.problems())
        assert all("\n" not in p for p in report.problems())
        hurt = [c for c in report.components if c.file.startswith(str(bad.parent))]
        assert hurt and not any(c.ok for c in hurt), report.text()
        assert report.text().count("keys match the model exactly") == sum(c.ok for c in report.components)


@pytest.mark.parametrize("component, which, damage, says",
                         [c[1:] for c in CASES if c[0] in ("truncated-by-1-byte", "random-bytes", "wrong-shape",
                                                          "config-wrong-type", "weights-file-is-a-directory")],
                         ids=["truncated", "random", "wrong-shape", "config", "directory"])
def test_cli_inspect_exits_2_without_traceback(model, capsys, component, which, damage, says):
    from demofusion.cli import main

    bad = _damaged(model, component, which)
    damage(bad)
    rc = main(["inspect", str(model)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert says in out + err and str(bad) in out + err
    assert "problem(s): these weights would not load" in out
    assert rc == 2
    assert says in err


@pytest.fixture(scope="module")
def single_file(pristine, tmp_path_factory):
    pipe, _ = pristine
    sd = to_sgm(pipe.unet.state_dict(), pipe.unet.config.to_diffusers())
    sd.update({"first_stage_model." + k: v for k, v in pipe.vae.state_dict().items()})
    f = tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return f


SINGLE_CASES = [
    ("truncated", truncate(lambda n: n - 1), "truncated: the file has"),
    ("truncated-to-half", truncate(lambda n: n // 2), "truncated: the file has"),
    ("random-bytes", random_bytes, "not a safetensors file"),
    ("corrupt-header", edit_header(lambda h: h["model.diffusion_model.out.2.bias"].update(shape=[99])),
     "corrupt header: tensor 'model.diffusion_model.out.2.bias'"),
    ("wrong-shape", resave(lambda sd: sd.update({"model.diffusion_model.out.2.bias": torch.zeros(5)})),
     "the weights do not fit the UNet: 1 shape mismatch (conv_out.bias"),
]


@pytest.mark.parametrize("damage, says", [c[1:] for c in SINGLE_CASES], ids=[c[0] for c in SINGLE_CASES])
def test_single_file_checkpoint(single_file, tmp_path, damage, says):
    f = shutil.copy(single_file, tmp_path / single_file.name)
    damage(f)
    unet_only = "UNet" in says  # a UNet-only mismatch leaves the VAE loadable
    for load in (load_unet,) if unet_only else (load_unet, load_vae):
        line = _error_line(load, f)
        assert line.startswith(f"{f}: ") and says in line, line
        report = inspect(f)
        assert not report.ok and line in report.problems(), report.problems()
    if unet_only:
        assert load_vae(f).config.block_out_channels


def test_garbage_model_index_is_a_weights_error(model):
    (model / "model_index.json").write_text("{not json")
    line = _error_line(DemoFusionPipeline.from_pretrained, model)
    assert line.startswith(f"{model / 'model_index.json'}: not valid JSON")


def test_pristine_copy_loads_and_inspects_clean(model, capsys):
    from demofusion.cli import main

    assert inspect(model).ok and inspect(model).problems() == []
    DemoFusionPipeline.from_pretrained(model)
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert out.count("keys match the model exactly") == 4 and "problem" not in out
