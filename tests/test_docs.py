"""The manual: a short README over docs/ pages, every relative link and anchor resolves, all reachable."""

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 350

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto: ...


def _prose(text: str) -> str:
    """Markdown text without fenced code blocks and code spans (links and headings in them do not count)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the headings of a page: lower case, punctuation dropped, spaces to hyphens,
    a repeated slug suffixed -1, -2, ..."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def relative_links(path: Path) -> list[str]:
    """Link and image targets of a page that are not external addresses."""
    return [t for t in _LINK.findall(_prose(path.read_text(encoding="utf-8"))) if not _EXTERNAL.match(t)]


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """The relative links of a page whose file (inside root), or #anchor in a markdown file, is missing."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        missing = not dest.exists() or root.resolve() not in (dest, *dest.parents)
        if missing or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    return broken


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail to a docs/ page"


def test_there_is_a_manual():
    assert len(PAGES) >= 4


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_the_checker_sees_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## A b, `c`!\n## A b, `c`!\n```\n## not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](a.md#a-b-c) [ok](a.md#a-b-c-1) [ok](#see) [ext](https://example.org/x)\n"
        "## See\n`[code](missing.md)` [file](missing.md) [anchor](a.md#not-a-heading)\n"
    )
    assert anchors(tmp_path / "a.md") == {"top", "a-b-c", "a-b-c-1"}
    assert broken_links(page, tmp_path) == ["missing.md", "a.md#not-a-heading"]


def test_no_file_cites_a_document_outside_the_repository():
    """Code and docs say what the code does or cite the paper; a reader has no team notes or issue tracker."""
    pattern = re.compile(
        r"reco_behaviour|unimatch_behaviour|DESIGN\.md|§ ?\d|behaviour description|"
        r"\bissue ?#?\d",
        re.IGNORECASE,
    )
    globs = (
        "*.py",
        "*.md",
        "network/*.py",
        "dataset/*.py",
        "dataset/**/*.md",
        "bench/*.py",
        "tests/*.py",
        "docs/*.md",
        "model_weights/*.md",
    )
    files = {p for g in globs for p in REPO.glob(g)} - {Path(__file__).resolve()}
    hits = [
        f"{p.relative_to(REPO)}:{n}"
        for p in sorted(files)
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
