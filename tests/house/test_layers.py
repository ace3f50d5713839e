"""The package imports its own modules at module level; a function-level import of one is a
deliberate lazy load that says why.

* Every ``import`` statement inside a function or method body (at any depth) of a ``demofusion``
  module that imports a ``demofusion`` module — relative (``from .x import y``, ``from .. import
  x``) or absolute (``from demofusion.x import y``, ``import demofusion.x``) — carries a
  ``# lazy: <why>`` comment on one of its lines. Imports at module level, in class bodies and
  under ``if TYPE_CHECKING:`` are not function-level; third-party imports are not checked.
  The assertion message lists every unmarked import as ``path:line: statement``.
* ``import demofusion`` loads none of the optional or reference libraries (gradio, OpenCV,
  matplotlib, torch-fidelity, diffusers, transformers) and not torch either (its attributes are
  lazy), and ``import demofusion.cli`` loads none of the optional or reference libraries.
* The front ends share one layer below both: no module under ``demofusion/ui`` imports
  ``demofusion.cli`` (or anything in it), and no module under ``demofusion/frontend`` imports
  ``demofusion.cli`` or ``demofusion.ui`` — at any level, lazy imports included, relative or
  absolute (``from .. import cli`` counts). The assertion message lists each as
  ``path:line: statement``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import demofusion

ROOT = Path(demofusion.__file__).resolve().parent
PACKAGE = "demofusion"
MARK = "# lazy:"
OPTIONAL = ("gradio", "cv2", "matplotlib", "torch_fidelity", "diffusers", "transformers")


def _own(node: ast.Import | ast.ImportFrom) -> bool:
    """Whether an import statement imports a module of the package."""
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == PACKAGE
    return any(alias.name.split(".")[0] == PACKAGE for alias in node.names)


def function_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run only when a function (or method) is called."""
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, True)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    found.append(child)
            else:
                visit(child, in_function)

    visit(tree, False)
    return found


def unmarked(source: str) -> list[tuple[int, str]]:
    """(line, first line of the statement) of each function-level import of a package module
    without ``# lazy:`` on any of its lines."""
    lines = source.splitlines()
    out = []
    for node in function_level_imports(ast.parse(source)):
        text = lines[node.lineno - 1 : node.end_lineno]
        if _own(node) and not any(MARK in line for line in text):
            out.append((node.lineno, text[0].strip()))
    return out


def test_detector_sees_nested_imports_and_honours_the_mark():
    source = "\n".join([
        "from .errors import InputError",  # module level: fine
        "import torch",
        "class A:",
        "    from .config import knobs",  # class body: runs at import time, fine
        "    def method(self):",
        "        from ..pipeline import settings",  # 6: unmarked, in a method
        "def f():",
        "    import numpy",  # third party: not checked
        "    from demofusion.vae import load_vae",  # 9: unmarked, absolute
        "    def inner():",
        "        import demofusion.unet",  # 11: unmarked, nested function
        "    from .ui import app  # lazy: gradio",  # marked
        "    from .cli import (",
        "        main,  # lazy: the CLI sits above",  # marked on a continuation line
        "    )",
        "    from . import parallel",  # 16: unmarked, `from . import`
    ])
    assert unmarked(source) == [(6, "from ..pipeline import settings"), (9, "from demofusion.vae import load_vae"),
                                (11, "import demofusion.unet"), (16, "from . import parallel")]


def test_every_function_level_import_of_the_package_is_a_marked_lazy_load():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 50, "package not found"
    bad = [f"{path.relative_to(ROOT.parent)}:{line}: {text}"
           for path in files for line, text in unmarked(path.read_text(encoding="utf-8"))]
    assert not bad, (f"function-level imports of package modules without a `{MARK} <why>` comment (import them at "
                     "module level, or say why they must wait):\n" + "\n".join(bad))


def test_every_lazy_mark_says_why():
    bare = []
    for path in sorted(ROOT.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MARK in line and not line.split(MARK, 1)[1].strip():
                bare.append(f"{path.relative_to(ROOT.parent)}:{n}")
    assert not bare, f"`{MARK}` without a reason: " + ", ".join(bare)


def _loaded(module: str) -> list[str]:
    code = (f"import sys, {module}\n"
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(OPTIONAL) | {'torch'}!r})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT.parent)
    return out.stdout.split()


def test_importing_the_package_loads_no_optional_library_nor_torch():
    assert _loaded(PACKAGE) == []


def test_importing_the_cli_loads_no_optional_library():
    assert _loaded(f"{PACKAGE}.cli") == ["torch"]


def imported(module: str, is_package: bool, tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an import statement anywhere in ``tree`` may load, for
    the module named ``module``: ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a module)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - (node.level - is_package)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden_imports(module: str, is_package: bool, source: str, packages: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, first line of the statement) of each import in ``source`` that reaches into one of ``packages``."""
    lines = source.splitlines()
    hits = sorted({n for n, name in imported(module, is_package, ast.parse(source))
                   if any(_inside(name, p) for p in packages)})
    return [(n, lines[n - 1].strip()) for n in hits]


def test_layer_detector_resolves_relative_and_absolute_imports():
    source = "\n".join([
        "from ..cli.common import x",  # 1: relative, into cli
        "from .. import cli",  # 2: the package itself
        "from ..client import y",  # 3: only a name that starts alike: not cli
        "def f():",
        "    import demofusion.cli.args",  # 5: absolute, lazy
        "    from demofusion.cli import main  # lazy: x",  # 6
        "from ..frontend.runs import run_id",  # 7: the shared layer: fine
        "from . import runner",  # 8: its own package: fine
    ])
    assert forbidden_imports("demofusion.ui.runner", False, source, ("demofusion.cli",)) == [
        (1, "from ..cli.common import x"), (2, "from .. import cli"), (5, "import demofusion.cli.args"),
        (6, "from demofusion.cli import main  # lazy: x")]
    # in a package's __init__, one dot is the package itself
    assert forbidden_imports("demofusion.ui", True, "from ..cli import a\nfrom .cli import b", ("demofusion.cli",)) \
        == [(1, "from ..cli import a")]


def _reaching(folder: str, packages: tuple[str, ...]) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ not found"
    bad = []
    for path in files:
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        bad += [f"{path.relative_to(ROOT.parent)}:{n}: {text}"
                for n, text in forbidden_imports(module, is_package, path.read_text(encoding="utf-8"), packages)]
    return bad


def test_the_ui_imports_nothing_from_the_cli():
    bad = _reaching("ui", (f"{PACKAGE}.cli",))
    assert not bad, "the UI imports the CLI (import what both share from demofusion.frontend):\n" + "\n".join(bad)


def test_the_shared_front_end_layer_imports_neither_front_end():
    bad = _reaching("frontend", (f"{PACKAGE}.cli", f"{PACKAGE}.ui"))
    assert not bad, "demofusion/frontend imports a front end above it:\n" + "\n".join(bad)
