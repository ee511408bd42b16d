"""The documentation holds together: every relative link in README.md and docs/*.md resolves, anchors included.

Fast and Ray-free: it reads Markdown only. Anchors are GitHub's heading slugs.
"""

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from doc_examples import ROOT, doc_examples, doc_files

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", heading)  # images render no text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders its text
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """Link targets of a Markdown file (inline, reference-style, HTML href/src), outside code."""
    out = []
    for line in _prose_lines(path.read_text()):
        line = INLINE_CODE.sub("", line)
        out += LINK.findall(line) + HTML.findall(line)
        if m := REFERENCE.match(line):
            out.append(m.group(1))
    return out


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and dest.is_file() and unquote(anchor) not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, path.parent)}")
    return bad


def test_slugs_follow_github():
    assert slug("Set-up: two commands") == "set-up-two-commands"
    assert slug("Generating in one process: `flashtile generate`") == "generating-in-one-process-flashtile-generate"
    assert slug("Kubernetes (KubeRay)") == "kubernetes-kuberay"
    assert slug("Storage: models and outputs on S3") == "storage-models-and-outputs-on-s3"
    assert slug("Figure 7: output encoding, time and size per encoder and setting") == (
        "figure-7-output-encoding-time-and-size-per-encoder-and-setting")
    assert slug("max_in_flight and [the docs](x.md)") == "max_in_flight-and-the-docs"


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#two-words) [ok](#top) [web](https://example.com/x)\n"
                    "[bad](docs/b.md) [bad](docs/a.md#three) `[code](nowhere.md)`\n"
                    "```\n[fenced](nowhere.md)\n```\n# Top\n")
    assert broken_links(page) == ["docs/b.md: no such file", "docs/a.md#three: no heading #three in docs/a.md"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file()
    assert broken_links(path) == []


def test_every_example_the_cluster_tests_run_is_found_once():
    # tests/test_cluster.py runs these against a real cluster; here, without one, they must at least be found.
    examples = doc_examples()  # raises on a name marked twice
    assert set(examples) == {"curl-png", "curl-json", "python", "openai", "python-retry"}
    assert {name: ex.lang for name, ex in examples.items()} == {
        "curl-png": "bash", "curl-json": "bash", "python": "python", "openai": "python", "python-retry": "python"}
    for ex in examples.values():
        assert ex.code.strip() and "```" not in ex.code
