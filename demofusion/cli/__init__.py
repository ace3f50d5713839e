"""The `demofusion` command: generate, upscale, ablate, download, inspect (see docs/cli.md).

One error path: every failure is one line on stderr — exit 2 for input that cannot be used
(arguments, files, weights, images), 1 for a failed run (NaN/Inf) or an internal error
(``--debug`` shows its traceback), 130 for Ctrl-C (finished phases are kept).
"""

from __future__ import annotations

import sys

from ..errors import InputError, NonFiniteError, first_line
from ..hub import DownloadError, download
from ..inspection import inspect
from ..outputs import META_KEY, RUN_FILE, read_png_params, save_png
from ..ui import INSTALL_HINT, have_gradio, launch  # the UI's gradio-free front door: gradio loads in launch
from . import ranks, streams
from .ablate import cmd_ablate, contact_sheet
from .args import ABLATIONS, add_config_flags, build_parser
from ..frontend.errors import CLIError
from .evaluate import cmd_evaluate, register
from .generate import cmd_generate, cmd_upscale

__all__ = ["main", "build_parser", "CLIError", "read_png_params", "save_png", "contact_sheet", "META_KEY", "RUN_FILE",
           "ABLATIONS", "add_config_flags"]


def cmd_download(args) -> int:
    try:
        path = download(args.model, args.dir, args.variant, args.single_file)
    except DownloadError as e:
        raise CLIError(str(e)) from e
    flag = "--controlnet" if args.model.startswith("controlnet") else "--model"
    print(f"downloaded to {path}; use it with `demofusion generate {flag} {path}`")
    return 0


def cmd_inspect(args) -> int:
    report = inspect(args.path)
    print(report.text())
    if not report.ok:
        more = len(report.problems()) - 1
        raise CLIError(report.problems()[0] + (f" (+{more} more problems above)" if more else ""))
    return 0


def cmd_ui(args) -> int:
    """`demofusion ui`: the browser UI (docs/cli.md, ui); gradio is imported only here (in ``launch``)."""
    if not have_gradio():
        raise CLIError(INSTALL_HINT)
    try:
        return launch(model=args.model, host=args.host, port=args.port, controlnet=args.controlnet,
                      device=args.device, share=args.share, out=args.out,
                      setup={k: getattr(args, k) for k in ("vae", "lora", "scheduler", "sigmas", "timestep_spacing")})
    except KeyboardInterrupt:
        return 0


COMMANDS = {"generate": cmd_generate, "upscale": cmd_upscale, "ablate": cmd_ablate, "download": cmd_download,
            "inspect": cmd_inspect, "ui": cmd_ui, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    """The `demofusion` command; a closed stdout (`| head -1`) ends it quietly with exit 141."""
    streams.ascii_fallback()  # × → x where the terminal's encoding lacks it
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return streams.closed_pipe()


def _main(argv: list[str] | None) -> int:
    try:
        args = register(build_parser()).parse_args(argv)  # + evaluate, ablate --metrics
    except SystemExit as e:  # a bad command line (one line said) → 2; --help / --version → 0
        return e.code if isinstance(e.code, int) else 0
    debug = getattr(args, "debug", False)
    try:
        return COMMANDS[args.command](args)
    except InputError as e:  # CLIError, WeightsError and every validation error
        return ranks.fail(2, f"error: {first_line(e)}")
    except NonFiniteError as e:
        return ranks.fail(1, f"error: {first_line(e)}")
    except BrokenPipeError:  # stdout closed by its reader: not an error of the run (main)
        raise
    except KeyboardInterrupt:
        return ranks.fail(130, "interrupted; finished phases are saved — continue with `demofusion generate --resume OUT`")
    except Exception as e:  # a bug of ours: one line, the traceback on request
        if debug:
            raise
        return ranks.fail(1, f"error: internal error ({type(e).__name__}: {first_line(e)}); run again with --debug "
                          "for the traceback and please report it")
    finally:
        ranks.leave()  # under torchrun: leave the process group
