"""Every file the repository's code, tests and docs point at is in the repository: ``docs/x.md``,
``tests/…py``, ``benchmarks/…py`` paths in source and prose, and relative Markdown links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [*ROOT.glob("demofusion/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py"),
           *ROOT.glob("docs/**/*.md"), ROOT / "README.md", *ROOT.glob("weights/*.md")]
SOURCES = [f for f in SOURCES if f != Path(__file__).resolve()]  # this file names missing ones on purpose
# a repository path: one of our top-level folders, then a file name with an extension we write
PATH = re.compile(r"(?<![\w./-])((?:docs|tests|benchmarks|demofusion|weights)/[\w./-]*\w\.(?:md|py|json|toml))")
LINK = re.compile(r"\]\(([^)#\s]+\.(?:md|py|png|json))(?:#[^)]*)?\)")


def _missing() -> list[str]:
    out = []
    for f in SOURCES:
        text = f.read_text(encoding="utf-8")
        for m in PATH.finditer(text):
            if not (ROOT / m.group(1)).exists():
                out.append(f"{f.relative_to(ROOT)}: {m.group(1)}")
        if f.suffix == ".md":
            for m in LINK.finditer(text):
                target = m.group(1)
                if "://" not in target and not (f.parent / target).exists():
                    out.append(f"{f.relative_to(ROOT)}: link {target}")
    return out


def test_every_referenced_file_is_in_the_repository():
    assert _missing() == []


def test_the_check_sees_a_dangling_reference(tmp_path):
    assert PATH.findall("see docs/nowhere.md and tests/helpers/toy.py") == ["docs/nowhere.md", "tests/helpers/toy.py"]
    assert LINK.findall("[a](algorithm.md#x) [b](https://x.org/a.md)") == ["algorithm.md", "https://x.org/a.md"]
    assert not (ROOT / "docs/nowhere.md").exists()


def test_no_reference_to_files_outside_the_repository():
    design = "DESIGN" + ".md"  # the design notes live beside the project, not in it
    outside = [f"{f.relative_to(ROOT)}" for f in SOURCES if design in f.read_text(encoding="utf-8")]
    assert outside == []
