"""`demofusion evaluate` / df.evaluate against the libraries themselves.

Random-weight Inception-v3 (torch-fidelity's layout) and CLIP (transformers' layout), written here:
nothing is downloaded. Our numbers must equal torch-fidelity's ``calculate_metrics`` and torchmetrics'
metric classes on the same files and weights within 1e-4 relative; each mutant of the protocol (resize
filter, unseeded or wrong-size crops, wrong input range) must move a number beyond that tolerance."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from demofusion.cli import main
from demofusion.evaluate import evaluate
from tests.helpers.eval_weights import save_pictures, write_random_clip, write_random_inception

TOL = 1e-4  # relative: how close our numbers must be to the libraries'
CROP = {"crops": 2, "crop_size": 64, "crop_seed": 0}


def close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=TOL, abs_tol=1e-12)


def moved(a, b) -> bool:
    return abs(a - b) > TOL * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"inception": write_random_inception(root / "weights-inception-random.pth"),
            "gen": save_pictures(root / "gen", 3, 96, seed=0), "ref": save_pictures(root / "ref", 3, 80, seed=100),
            "root": root}


@pytest.fixture(scope="module")
def ours(files):
    """Our torch-fidelity-backend result, with the crops saved for the library to read back."""
    crops = files["root"] / "crops"
    r = evaluate(files["gen"], files["ref"], save_crops=crops, inception_weights=files["inception"], device="cpu",
                 metrics=["fid", "kid", "is"], **CROP)
    return r, crops


@pytest.fixture(scope="module")
def fidelity(files, ours):
    """torch-fidelity's own numbers: whole pictures, and the saved crops."""
    from torch_fidelity import calculate_metrics

    _, crops = ours

    def library(a, b, subset, splits):
        return calculate_metrics(input1=str(a), input2=str(b), fid=True, kid=True, isc=True, cuda=False,
                                 feature_extractor_weights_path=str(files["inception"]), kid_subset_size=subset,
                                 isc_splits=splits, rng_seed=2020, verbose=False, save_cpu_ram=True)

    return {"whole": library(files["gen"], files["ref"], 3, 1),
            "crop": library(crops / "images", crops / "reference", 6, 3)}


@pytest.mark.parity
def test_fid_kid_is_and_crop_variants_equal_torch_fidelity(ours, fidelity, files):
    r, crops = ours
    for suffix, lib in (("", fidelity["whole"]), ("_crop", fidelity["crop"])):
        assert close(r["fid" + suffix], lib["frechet_inception_distance"])
        assert close(r["kid" + suffix]["mean"], lib["kernel_inception_distance_mean"])
        assert close(r["kid" + suffix]["std"], lib["kernel_inception_distance_std"])
        assert close(r["is" + suffix]["mean"], lib["inception_score_mean"])
        assert close(r["is" + suffix]["std"], lib["inception_score_std"])
    assert r["is_crop"]["mean"] > 1.01 and r["kid"]["mean"] > 0  # real numbers, not a degenerate 1 / 0
    assert len(list((crops / "images").iterdir())) == 6 and len(list((crops / "reference").iterdir())) == 6
    p = r["protocol"]
    assert p["inception_sha256"] == hashlib.sha256(files["inception"].read_bytes()).hexdigest()
    assert p["backend"] == "torch-fidelity" and "no antialias" in p["resize"]
    assert (p["crops"], p["crop_size"], p["crop_seed"]) == (2, 64, 0)
    assert p["counts"]["crop"] == {"kid_subsets": 100, "kid_subset_size": 6, "isc_splits": 3}
    assert p["versions"]["torch-fidelity"] and json.dumps(r)  # JSON-clean


@pytest.mark.parity
def test_torchmetrics_backend_equals_torchmetrics(files):
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    from demofusion.evaluate.sources import image_set, read_rgb

    r = evaluate(files["gen"], files["ref"], crops=0, inception_weights=files["inception"], device="cpu",
                 backend="torchmetrics", metrics=["fid", "kid", "is"])
    w = str(files["inception"])
    gen = torch.stack([read_rgb(f) for f in image_set(files["gen"]).files])
    ref = torch.stack([read_rgb(f) for f in image_set(files["ref"]).files])
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=w)
    kid = KernelInceptionDistance(feature=NoTrainInceptionV3("inception-v3-compat", ["2048"], w), subset_size=3)
    isc = InceptionScore(feature=NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], w), splits=1)
    for m in (fid, kid):
        m.update(ref, real=True)
        m.update(gen, real=False)
    isc.update(gen)
    torch.manual_seed(2020)
    kid_mean, kid_std = kid.compute()
    torch.manual_seed(2020)
    is_mean, _ = isc.compute()
    assert close(r["fid"], float(fid.compute()))
    assert close(r["kid"]["mean"], float(kid_mean)) and close(r["kid"]["std"], float(kid_std))
    lib_is = float(is_mean)  # torchmetrics' IS runs in float32: these random logits underflow it to NaN
    assert (r["is"] is None and not math.isfinite(lib_is)) or close(r["is"]["mean"], lib_is)
    assert "antialias" in r["protocol"]["resize"]


@pytest.mark.parity
def test_clip_score_equals_torchmetrics_and_reads_prompts_from_our_metadata(files, tmp_path):
    from PIL import Image
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from demofusion.outputs import save_png

    clip = write_random_clip(tmp_path / "clip")
    prompts = ["a red barn", "blue sea at noon", "a cat"]
    tagged = tmp_path / "tagged"
    tagged.mkdir()
    pictures = sorted(files["gen"].iterdir())
    for f, prompt in zip(pictures, prompts):
        save_png(Image.open(f), tagged / f.name, {"prompt": prompt})
    r = evaluate(tagged, clip_model=str(clip), metrics=["clip"], device="cpu")
    given = evaluate(files["gen"], prompts=prompts, clip_model=str(clip), metrics=["clip"], device="cpu")
    class Tensors(torch.nn.Module):  # transformers 5 returns output objects; torchmetrics 1.9 wants tensors
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, pixel_values):
            out = self.m.get_image_features(pixel_values=pixel_values)
            return out if torch.is_tensor(out) else out.pooler_output

        def get_text_features(self, input_ids, attention_mask):
            out = self.m.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out if torch.is_tensor(out) else out.pooler_output

    lib = CLIPScore(model_name_or_path=lambda: (Tensors(CLIPModel.from_pretrained(clip)),
                                                CLIPProcessor.from_pretrained(clip)))
    lib.update(torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                            for f in pictures]), prompts)
    assert close(r["clip_score"], float(lib.compute())) and r["clip_score"] == given["clip_score"]
    assert r["protocol"]["clip_model"] == str(clip)


def test_mutant_resize_filter_moves_the_numbers(files, fidelity, monkeypatch):
    """pytorch-fid's filter (plain bilinear, half-pixel) instead of torch-fidelity's TF1-style one."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from demofusion.evaluate import inception

    monkeypatch.setattr(inception, "_CACHE", {})
    monkeypatch.setattr(fe, "interpolate_bilinear_2d_like_tensorflow1x",
                        lambda x, size, align_corners: F.interpolate(x, size=size, mode="bilinear", align_corners=False))
    r = evaluate(files["gen"], files["ref"], crops=0, inception_weights=files["inception"], device="cpu",
                 metrics=["kid", "is"])
    assert moved(r["kid"]["mean"], fidelity["whole"]["kernel_inception_distance_mean"])


def test_mutant_wrong_input_range_moves_the_numbers(files, fidelity, monkeypatch):
    """Pictures read as [0, 1] and mapped as if they were [-1, 1] (the classic range slip)."""
    from demofusion.evaluate import sources

    read = sources.read_rgb
    monkeypatch.setattr(sources, "read_rgb", lambda p: (read(p).float() / 255 * 127.5 + 127.5).to(torch.uint8))
    import demofusion.evaluate as ev

    monkeypatch.setattr(ev, "read_rgb", sources.read_rgb)
    r = evaluate(files["gen"], files["ref"], crops=0, inception_weights=files["inception"], device="cpu",
                 metrics=["kid", "is"])
    assert moved(r["kid"]["mean"], fidelity["whole"]["kernel_inception_distance_mean"])


def test_crops_are_seeded_and_sized_and_mutants_move_the_crop_numbers(files, fidelity, tmp_path, monkeypatch):
    from demofusion.evaluate import crops as crops_mod

    again = evaluate(files["gen"], save_crops=tmp_path / "again", inception_weights=files["inception"], device="cpu",
                     metrics=["is"], **CROP)
    first = files["root"] / "crops" / "images"
    assert all((tmp_path / "again" / "images" / f.name).read_bytes() == f.read_bytes() for f in first.iterdir())
    assert close(again["is_crop"]["mean"], fidelity["crop"]["inception_score_mean"])
    wrong_size = evaluate(files["gen"], inception_weights=files["inception"], device="cpu", metrics=["is"],
                          **(CROP | {"crop_size": 48}))
    assert moved(wrong_size["is_crop"]["mean"], fidelity["crop"]["inception_score_mean"])
    boxes = crops_mod.crop_boxes
    monkeypatch.setattr(crops_mod, "crop_boxes", lambda h, w, size, count, seed, index:
                        boxes(h, w, size, count, int(np.random.SeedSequence().entropy % 2**32), index))
    unseeded = evaluate(files["gen"], inception_weights=files["inception"], device="cpu", metrics=["is"], **CROP)
    assert moved(unseeded["is_crop"]["mean"], fidelity["crop"]["inception_score_mean"])


def test_offline_without_weights_is_one_line_exit_2_nothing_written(files, tmp_path, monkeypatch, capsys):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from demofusion.evaluate import inception

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "_CACHE", {})
    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    out, crops = tmp_path / "r.json", tmp_path / "crops"
    cases = [([], "--inception-weights FILE"),
             (["--inception-weights", str(tmp_path / "nope.pth")], f"--inception-weights {tmp_path / 'nope.pth'}"),
             (["--inception-weights", str(files["inception"]), "--clip-model", str(tmp_path / "noclip")],
              f"--clip-model {tmp_path / 'noclip'}")]
    for extra, named in cases:
        rc = main(["evaluate", str(files["gen"]), "--reference", str(files["ref"]), "--json", str(out),
                   "--save-crops", str(crops), "--crop-size", "64", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err, err
        assert "Traceback" not in err and not out.exists() and not crops.exists()


def test_cli_json_markdown_and_no_overwrite(files, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["evaluate", str(files["gen"]), "--inception-weights", str(files["inception"]), "--crops", "2",
            "--crop-size", "64", "--metrics", "is", "--eval-device", "cpu"]
    assert main([*args, "--json", str(out), "--markdown"]) == 0
    shown = capsys.readouterr().out
    assert "| set | IS | IS_c |" in shown and "torch-fidelity" in shown
    saved = json.loads(out.read_text())
    assert set(saved) >= {"fid", "kid", "is", "fid_crop", "kid_crop", "is_crop", "clip_score", "protocol"}
    before = out.read_bytes()
    assert main([*args, "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


def test_ablate_metrics_table_json_plot_match_the_contact_sheet_and_a_cell_reads_per_phase(files, tmp_path):
    from PIL import Image

    out = tmp_path / "abl"
    assert main(["ablate", "--model", "tiny", "--height", "512", "--width", "512", "--steps", "2", "--seed", "3",
                 "--grid", "full,no-dilated-sampling", "--out", str(out), "--no-progress", "--metrics", "kid",
                 "--reference", str(files["ref"]), "--inception-weights", str(files["inception"]),
                 "--crops", "2", "--crop-size", "64", "--eval-device", "cpu"]) == 0
    record = json.loads((out / "ablation.json").read_text())
    table = json.loads((out / "metrics.json").read_text())
    assert [c["name"] for c in table["cells"]] == [c["name"] for c in record["cells"]]  # the sheet's order
    assert [c["image"] for c in table["cells"]] == [c["images"][-1] for c in record["cells"]]
    assert [c["default"] for c in table["cells"]] == [True, False]
    md = (out / "metrics.md").read_text()
    assert md.index("| full * |") < md.index("| no-dilated-sampling |") and "KID_c" in md
    assert Image.open(out / "metrics.png").size[0] > 100
    full = table["cells"][0]
    alone = evaluate([full["image"]], files["ref"], inception_weights=files["inception"], device="cpu",
                     metrics=["kid"], **CROP)
    assert alone["kid_crop"] == full["kid_crop"] and full["kid_crop"]["mean"] != table["cells"][1]["kid_crop"]["mean"]
    assert full["kid"] is None  # one picture: no whole-picture KID (two samples needed)
    phases = evaluate(out / "full", files["ref"], inception_weights=files["inception"], device="cpu",
                      metrics=["kid"], **CROP)["phases"]
    assert list(phases) == ["phase_1", "phase_2"]
    assert phases["phase_2"]["kid_crop"] == full["kid_crop"]
