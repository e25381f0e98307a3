"""Citations of Markdown documents resolve, and so do the relative links of the README and docs/.

Code, configs, tests, the README, the Makefile and the design documents cite documents by a path ending in
``.md``, optionally with ``#anchor`` (e.g. ``docs/recipe.md#learning-rate-schedules``). A citation must name
a file the repository holds (relative to the citing file or to the repository root), and its anchor must be
a heading of that file as GitHub turns headings into anchors. Markdown links ``[text](target)`` in the README and
docs/ must lead to an existing file (and heading). The checks are plain functions so that the tests can also
run them on a made-up tree and see them fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("fovlm", "data_prep", "configs", "tests", "docs")
SCANNED_FILES = ("README.md", "Makefile")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"}

# A path ending in ".md" (not part of a longer path or word), optionally followed by "#anchor".
CITATION = re.compile(r"(?<![\w./-])((?:\.{1,2}/)*(?:[\w-]+/)*[\w.-]*\w\.md)(?:#([\w-]+))?(?![\w])")
# A Markdown link or image: [text](target) or [text](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def scanned_files(root: Path) -> list[Path]:
    """The text files whose citations are checked: the scanned folders' text files, the README, the Makefile."""
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            parts = path.relative_to(root).parts
            if path.is_file() and path.suffix in TEXT_SUFFIXES and not any(
                p.startswith(".") or p == "__pycache__" for p in parts
            ):
                files.append(path)
    return files


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown text (headings inside fenced code blocks are not headings)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def citations(text: str) -> Iterator[tuple[int, str, str | None]]:
    """(line number, path, anchor or None) of every Markdown document cited in ``text``."""
    for number, line in enumerate(text.splitlines(), start=1):
        for match in CITATION.finditer(line):
            yield number, match.group(1), match.group(2)


def resolve(target: str, citing: Path, root: Path) -> Path | None:
    """The file ``target`` names, relative to the citing file's folder or else to the repository root."""
    for base in (citing.parent, root):
        path = (base / target).resolve()
        if path.is_file() and path.is_relative_to(root.resolve()):
            return path
    return None


def check_target(target: str, anchor: str | None, citing: Path, root: Path) -> str | None:
    """Why ``target#anchor`` cited from ``citing`` does not resolve, or None when it does."""
    path = resolve(target, citing, root) if target else citing.resolve()
    if path is None:
        return f"{target}: no such file in the repository"
    if anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
        return f"{target or path.name}#{anchor}: no such section in {path.relative_to(root.resolve())}"
    return None


def broken_citations(root: Path, files: Iterable[Path]) -> list[str]:
    """``file:line: problem`` for every cited Markdown document or section that does not exist."""
    problems = []
    for file in files:
        for number, target, anchor in citations(file.read_text(encoding="utf-8", errors="replace")):
            problem = check_target(target, anchor, file, root)
            if problem:
                problems.append(f"{file.relative_to(root)}:{number}: {problem}")
    return problems


def broken_links(root: Path, files: Iterable[Path]) -> list[str]:
    """``file:line: problem`` for every relative Markdown link (or same-page ``#anchor``) that leads nowhere."""
    problems = []
    for file in files:
        in_fence = False
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if FENCE.match(line):
                in_fence = not in_fence
            if in_fence:
                continue
            for match in LINK.finditer(line):
                link = match.group(1)
                if SCHEME.match(link) or link.startswith("//"):
                    continue  # http(s), mailto: not checked offline
                target, _, anchor = link.partition("#")
                path = (file.parent / target).resolve() if target else file
                if target and not path.exists():
                    problems.append(f"{file.relative_to(root)}:{number}: {link}: no such file")
                    continue
                problem = check_target(target, anchor or None, file, root) if path.is_file() else None
                if problem:
                    problems.append(f"{file.relative_to(root)}:{number}: {link}: {problem}")
    return problems


def markdown_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------------------------


def test_every_cited_document_and_section_exists():
    files = scanned_files(ROOT)
    assert ROOT / "fovlm" / "losses.py" in files and ROOT / "Makefile" in files  # the scan sees the code
    problems = broken_citations(ROOT, files)
    assert not problems, "citations of missing documents or sections:\n" + "\n".join(problems)


def test_readme_and_docs_links_resolve():
    pages = markdown_pages(ROOT)
    assert len(pages) > 2
    problems = broken_links(ROOT, pages)
    assert not problems, "links that lead nowhere:\n" + "\n".join(problems)


def test_design_documents_are_indexed():
    """Every page of docs/ is linked from docs/README.md, and the README points at docs/."""
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {m.group(1).partition("#")[0] for m in LINK.finditer(index)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, f"docs pages missing from docs/README.md: {sorted(pages - linked)}"
    assert "docs/README.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_slugs_follow_github():
    assert slug("Learning-rate schedules") == "learning-rate-schedules"
    assert slug("The recipe (`make demo`)") == "the-recipe-make-demo"
    assert slug("What did not work (same task; the first two)") == "what-did-not-work-same-task-the-first-two"
    assert slug("DPO pair forward and loss") == "dpo-pair-forward-and-loss"
    assert slug("See [the model](model.html)") == "see-the-model"
    text = "# Title\n## Notes\n```\n## not a heading\n```\n## Notes\n"
    assert anchors(text) == {"title", "notes", "notes-1"}


def test_checks_fail_on_missing_documents_sections_and_links(tmp_path):
    """The same functions, on a made-up tree: a missing page, a missing section and broken links are found."""
    md = "md"  # spelled apart so that this file itself cites nothing that does not exist
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / f"real.{md}").write_text("# Real\n\n## A section\n\ntext [back](#a-section)\n", encoding="utf-8")
    code = tmp_path / "pkg" / "mod.py"
    code.parent.mkdir()
    code.write_text(
        f'"""See docs/real.{md}#a-section and docs/real.{md}.\n\n'
        f'Also docs/absent.{md}, docs/real.{md}#no-such-section and ARCHITECTURE.{md} section 9."""\n',
        encoding="utf-8",
    )
    problems = broken_citations(tmp_path, [code])
    assert len(problems) == 3, problems
    assert any(f"absent.{md}: no such file" in p for p in problems)
    assert any(f"real.{md}#no-such-section: no such section" in p for p in problems)
    assert any(f"ARCHITECTURE.{md}: no such file" in p for p in problems)
    assert all(p.startswith("pkg/mod.py:") for p in problems)

    page = docs / f"links.{md}"
    page.write_text(
        f"[ok](real.{md}#a-section) [gone](gone.{md}) [bad](real.{md}#nope) [self](#missing)\n"
        f"[web](https://example.org/x.{md}) ![pic](missing.png)\n"
        f"```\n[in code](nowhere.{md})\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(tmp_path, [page, docs / f"real.{md}"])
    assert len(problems) == 4, problems
    assert [p.split(": ", 1)[1].split(":")[0] for p in problems] == [
        f"gone.{md}", f"real.{md}#nope", "#missing", "missing.png"]
