"""Write a benchmark's figures into docs/benchmarks.md: one ``## Title`` section, replaced or appended."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(title: str, text: str, doc: Path = DOC) -> None:
    old = doc.read_text()
    section = f"## {title}\n\n" + text.strip() + "\n"
    m = re.search(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", old, flags=re.S | re.M)
    if m is None:
        doc.write_text(old.rstrip() + "\n\n" + section)
    else:
        rest = old[m.end():]
        doc.write_text(old[: m.start()] + section + ("\n" + rest if rest else ""))
