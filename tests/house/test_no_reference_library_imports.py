"""Package-wide rules: the package never imports diffusers (nor transformers / open_clip)."""

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[2] / "demofusion"
FORBIDDEN = {"diffusers", "transformers", "open_clip"}
# The one exception: `demofusion evaluate`'s CLIP score (optional [eval] extra) hands torchmetrics'
# CLIPScore a transformers CLIP, imported inside the loader only (never at import time: see below).
ALLOWED = {("evaluate/clip.py", "transformers")}


def _imported_roots(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.lineno


def test_package_source_never_imports_reference_libraries():
    files = sorted(PKG.rglob("*.py"))
    assert files, "package not found"
    bad = [
        f"{f.relative_to(PKG.parent)}:{line} imports {root}"
        for f in files
        for root, line in _imported_roots(f)
        if root in FORBIDDEN and (str(f.relative_to(PKG).as_posix()), root) not in ALLOWED
    ]
    assert not bad, "\n".join(bad)


def test_importing_every_module_loads_no_reference_library():
    mods = sorted(
        ".".join(f.relative_to(PKG.parent).with_suffix("").parts).replace(".__init__", "")
        for f in PKG.rglob("*.py")
        if f.name != "__main__.py"  # `python -m` entry points run the CLI when imported
    )
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
