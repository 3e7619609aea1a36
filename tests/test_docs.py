"""The documentation holds together: README.md and every page under docs/.

- every relative Markdown link (and image) resolves to a file or folder inside the repository, and a `#anchor`
  into a Markdown page (or within the page) names one of its headings, by GitHub's slug rules;
- README.md stays a front door: under 200 lines;
- no page reads like a lab notebook ("this session", "previous session", "last session", "this round", "today").

Each problem is one line: `file:line: what is wrong`. No network: http(s) and mailto links are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
NOTEBOOK_WORDS = re.compile(r"this session|previous session|last session|this round|\btoday\b", re.IGNORECASE)

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
EXTERNAL = ("http://", "https://", "mailto:")


def pages(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    found = [root / "README.md"] if (root / "README.md").is_file() else []
    return found + sorted((root / "docs").rglob("*.md"))


def prose_lines(text: str):
    """(line number, line) for each line outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered (code marks and link targets dropped), lowercase,
    punctuation other than - and _ dropped, each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def link_problems(root: Path, files: list[Path]) -> list[str]:
    """One line per relative link that does not resolve: `file:line: broken link 'target' (why)`."""
    root = root.resolve()
    cache: dict[Path, set[str]] = {}
    problems = []
    for page in files:
        name = page.relative_to(root).as_posix()
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
            for m in LINK.finditer(line):
                target = m.group(1)
                if target.lower().startswith(EXTERNAL):
                    continue
                path_part, _, anchor = target.partition("#")
                where = f"{name}:{number}: broken link '{target}'"
                dest = (page.parent / unquote(path_part)).resolve() if path_part else page.resolve()
                if not dest.is_relative_to(root):
                    problems.append(f"{where} (points outside the repository)")
                    continue
                if not dest.exists():
                    problems.append(f"{where} (no such file: {dest.relative_to(root).as_posix()})")
                    continue
                if anchor and dest.suffix == ".md":
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if unquote(anchor).lower() not in cache[dest]:
                        problems.append(f"{where} (no heading #{anchor} in {dest.relative_to(root).as_posix()})")
    return problems


def notebook_problems(root: Path, files: list[Path]) -> list[str]:
    """One line per lab-notebook phrase: `file:line: notebook wording 'today'`."""
    problems = []
    for page in files:
        name = page.relative_to(root.resolve()).as_posix()
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for m in NOTEBOOK_WORDS.finditer(line):
                problems.append(f"{name}:{number}: notebook wording '{m.group(0)}' (write for a user, in the present tense)")
    return problems


def readme_problems(root: Path) -> list[str]:
    lines = len((root / "README.md").read_text(encoding="utf-8").splitlines())
    if lines >= README_MAX_LINES:
        return [f"README.md:{lines}: README.md has {lines} lines; keep it under {README_MAX_LINES} (move detail to docs/)"]
    return []


def _fail_on(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


def test_every_relative_link_resolves():
    _fail_on(link_problems(ROOT, pages(ROOT)))


def test_readme_is_under_200_lines():
    _fail_on(readme_problems(ROOT))


def test_no_page_reads_like_a_lab_notebook():
    _fail_on(notebook_problems(ROOT, pages(ROOT)))


def test_the_checks_name_file_line_and_culprit(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "README.md").write_text(
        "# Front door\n\n"
        "[ok](docs/a.md#the-kernels-modelattention_impl) [ok](docs/sub/) [ok](#front-door) `[x](in-code.md)`\n"
        "[web](https://example.com/x.md) [mail](mailto:a@b.c)\n"
        "[gone](docs/missing.md)\n"
        "![img](docs/nope.png)\n"
        "[out](../shared/DESIGN.md)\n"
        "```\n[fenced](not-checked.md)\n```\n" + "line\n" * 200)
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## The kernels (`model.attention_impl`)\n\n## Twice\n\n## Twice\n\n"
        "[ok](#twice-1) [bad anchor](#twice-2) [bad](../README.md#nowhere)\n"
        "Measured Today.\n")
    files = pages(tmp_path)
    assert link_problems(tmp_path, files) == [
        "README.md:5: broken link 'docs/missing.md' (no such file: docs/missing.md)",
        "README.md:6: broken link 'docs/nope.png' (no such file: docs/nope.png)",
        "README.md:7: broken link '../shared/DESIGN.md' (points outside the repository)",
        "docs/a.md:9: broken link '#twice-2' (no heading #twice-2 in docs/a.md)",
        "docs/a.md:9: broken link '../README.md#nowhere' (no heading #nowhere in README.md)",
    ]
    assert notebook_problems(tmp_path, files) == [
        "docs/a.md:10: notebook wording 'Today' (write for a user, in the present tense)"]
    assert readme_problems(tmp_path) == [
        "README.md:210: README.md has 210 lines; keep it under 200 (move detail to docs/)"]
