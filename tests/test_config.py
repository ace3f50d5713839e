"""DemoFusionConfig: the knobs written once (docs/algorithm.md, "Where to change X").

Adding a knob is a field plus its use: a config subclass with one extra field becomes a CLI flag
(help, range check), a UI control (label, help), a run-id and a PNG metadata key through the same
generator functions the package uses — no other list to edit. The package's own front ends are
built by those functions, and the run ids of existing runs stay what they were.
"""

import hashlib
import inspect
import json
from dataclasses import dataclass, fields

import pytest

import demofusion as df
from demofusion.cli.args import Parser, add_config_flags, build_parser
from demofusion.frontend.runs import run_id
from demofusion.config import DemoFusionConfig, knob, knobs
from demofusion.errors import InputError
from demofusion.outputs import a1111_parameters
from demofusion.pipeline.settings import validate
from demofusion.ui.knobs import LABELS, control_spec, page_value


@dataclass(frozen=True)
class WithAlpha1End(DemoFusionConfig):
    """A researcher's knob: the end value of α1 (its use would read ``s.cosine_scale_1_end``)."""

    cosine_scale_1_end: float = knob(0.0, "α1 at the last step of a phase (a schedule's end value).", "float",
                                     lo=0.0, hi=10.0)


def extra(cls=WithAlpha1End):
    return next(k for k in knobs(cls) if k.name == "cosine_scale_1_end")


def test_a_new_knob_is_a_cli_flag_with_its_help_and_range(capsys):
    p = Parser(prog="demofusion generate")
    add_config_flags(p, WithAlpha1End)  # what `demofusion generate` calls with DemoFusionConfig
    assert p.parse_args(["--cosine-scale-1-end", "2.5"]).cosine_scale_1_end == 2.5
    assert p.parse_args([]).cosine_scale_1_end is None  # not given: the caller tells flags from defaults
    assert "α1 at the last step" in p.format_help() and "0.0 … 10.0" in p.format_help()
    for bad in ("11", "nan", "abc"):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--cosine-scale-1-end", bad])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert "--cosine-scale-1-end" in err and bad in err and "Traceback" not in err, err


def test_a_new_knob_is_a_ui_control_with_its_label():
    spec = control_spec(extra())
    assert (spec["label"], spec["kind"], spec["value"], spec["elem_id"]) == \
        ("Cosine scale 1 end", "number", 0.0, "df-cosine_scale_1_end")
    assert "α1 at the last step" in spec["info"] and "0.0 … 10.0" in spec["info"]
    assert page_value(extra(), "1.5") == 1.5
    # gradio builds it with demofusion.ui.app.knob_control: tests/ui/test_runner_and_browser.py (importing gradio is slow)


def test_a_new_knob_is_a_run_id_and_metadata_key():
    params = {"prompt": "x", "height": 512, "width": 512, "num_inference_steps": 2, "guidance_scale": 7.5,
              "seed": 1, "model": "tiny", **{k.name: k.default for k in knobs()}}
    # at its default a new knob leaves the id alone (older runs keep theirs); set, it changes the id
    assert run_id(params, WithAlpha1End) == run_id(params)
    assert run_id(params | {"cosine_scale_1_end": 1.0}, WithAlpha1End) != run_id(params)
    text = a1111_parameters(params | {"cosine_scale_1_end": 1.0}, WithAlpha1End)
    assert "DemoFusion cosine scale 1 end: 1.0" in text


def test_a_new_knob_is_checked_by_the_config_and_read_by_the_run():
    with pytest.raises(InputError, match=r"^cosine_scale_1_end must be in \[0.0, 10.0\], got -1.0$"):
        WithAlpha1End(cosine_scale_1_end=-1)
    s = validate(256, prompt="x", height=512, width=512, config=WithAlpha1End(sigma=0.5), cosine_scale_1_end=2)
    assert (s.cosine_scale_1_end, s.sigma) == (2.0, 0.5)  # Settings reads a knob it has no field for
    with pytest.raises(InputError, match="cosine_scale_1_end"):
        validate(256, prompt="x", height=512, width=512, config=WithAlpha1End(), cosine_scale_1_end=99)
    with pytest.raises(InputError, match="unknown argument"):  # the plain config has no such knob
        validate(256, prompt="x", height=512, width=512, cosine_scale_1_end=2)


def test_the_package_front_ends_are_generated_from_the_config():
    cli = build_parser()._subparsers._group_actions[0].choices
    for command in ("generate", "upscale", "ablate"):
        flags = {s for a in cli[command]._actions for s in a.option_strings}
        assert all(k.flag in flags for k in knobs()), command
    from demofusion.ui.runner import Page

    page_fields = {f.name for f in fields(Page)}
    assert all(k.name in page_fields and k.name in LABELS for k in knobs())
    assert df.DemoFusionConfig is DemoFusionConfig


def test_pipe_takes_a_config_and_keyword_overrides():
    """``pipe(prompt, config=cfg, **overrides)`` (the call checks its arguments with validate, as here)."""
    params = inspect.signature(df.DemoFusionPipeline.__call__).parameters
    assert params["config"].default is None and params["knobs"].kind is inspect.Parameter.VAR_KEYWORD
    cfg = df.DemoFusionConfig(cosine_scale_1=2.0, stride=8, dilated_blur=False)
    s = validate(256, prompt="x", height=512, width=512, config=cfg, stride=16)
    assert (s.cosine_scale_1, s.stride, s.dilated_blur, s.sigma) == (2.0, 16, False, 0.8)
    s = validate(256, prompt="x", height=512, width=512)
    assert s.stride == 16 and s.config == DemoFusionConfig()  # default stride: half the 32-latent window
    with pytest.raises(InputError, match=r"^stride must be 1\.\.32, got 0 latents \(the window"):
        validate(256, prompt="x", height=512, width=512, config=cfg, stride=0)
    with pytest.raises(InputError, match="config must be a DemoFusionConfig"):
        validate(256, prompt="x", height=512, width=512, config={"stride": 8})


def test_run_ids_of_existing_runs_are_unchanged():
    """The run id of a run with the default knobs, hashed as before the config existed (the key list
    written out here is the old one), so older folders resume and older PNGs replay."""
    params = {"prompt": "x", "negative_prompt": None, "height": 512, "width": 512, "num_inference_steps": 2,
              "guidance_scale": 7.5, "seed": 1, "phases": None, "phase_sizes": None, "view_batch_size": None,
              "stride": 16, "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0, "sigma": 0.8,
              "multi_decoder": True, "skip_residual": True, "local_paths": True, "dilated_sampling": True,
              "dilated_blur": True, "renormalise": True, "view_jitter": True, "model": "tiny", "model_hash": "ab",
              "dtype": "float32", "image_sha256": None}
    old = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    assert run_id(params) == old
    assert run_id(params | {"base_size": 512}) != old  # the knob added with the config: only when set


def test_a_new_switch_is_an_ablate_cell_and_a_no_flag():
    @dataclass(frozen=True)
    class WithSwitch(DemoFusionConfig):
        phase_noise: bool = knob(True, "Fresh noise in every upscaling phase.", "bool", ablation=True)

    from demofusion.cli.args import ablations

    assert ablations(WithSwitch)["no-phase-noise"] == {"phase_noise": False}
    assert "no-phase-noise" not in ablations()  # the package's grid: the plain config's switches
    p = Parser(prog="demofusion ablate")
    add_config_flags(p, WithSwitch)
    assert p.parse_args(["--no-phase-noise"]).phase_noise is False and p.parse_args([]).phase_noise is None
    with pytest.raises(InputError, match=r"^phase_noise must be True or False, got str 'no'$"):
        WithSwitch(phase_noise="no")
