"""The documentation's runnable examples: code blocks marked `<!-- example: NAME -->` in README.md and docs/*.md.

tests/test_cluster.py runs them against the cluster; tests/test_docs.py checks that each is found, once.
"""

import re
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)\n```", flags=re.DOTALL)


class Example(NamedTuple):
    file: str  # where it lives, relative to the repository root
    lang: str
    code: str


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def doc_examples(root: Path = ROOT) -> dict[str, Example]:
    """{name: Example} for every marked block; a name used twice is an error (one place for each example)."""
    found: dict[str, Example] = {}
    for path in doc_files(root):
        for name, lang, code in MARKED.findall(path.read_text()):
            where = str(path.relative_to(root))
            if name in found:
                raise ValueError(f"example {name!r} is marked in both {found[name].file} and {where}")
            found[name] = Example(where, lang, code)
    return found
