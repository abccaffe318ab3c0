"""The front door stays a front door and the docs stay connected: README.md short, every relative link
(and #anchor) in README.md, docs/*.md and reports/README.md resolving, the CI test command on the front
page, every docs page reachable from the index, and every `--help` naming a docs page that exists."""
from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
LINKED_FILES = [README, ROOT / "reports" / "README.md", *PAGES]

CI_TEST_COMMAND = 'pip install -e ".[executor,dev]" && python3 -m pytest -q'
MAIN_JOB_COMMAND = 'pip install -e ".[executor,dev]" && spdsim run scenarios/a100x8.yaml'

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside code blocks, with code spans blanked (a `](` inside code is not a link)."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation other than - and _ removed,
    spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target) is not None      # https:, mailto:, chrome: …


def test_docs_exist():
    assert README.is_file() and DOCS.is_dir() and (DOCS / "README.md").is_file()
    assert len(PAGES) >= 2


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move depth into docs/"


def test_readme_has_the_two_commands_exactly():
    text = README.read_text(encoding="utf-8")
    assert CI_TEST_COMMAND in text        # CI runs this command: it must stay copy-paste runnable
    assert "python3 -m pytest -q" in text
    assert MAIN_JOB_COMMAND in text


def test_readme_picture_is_small():
    img = [t for t in links(README) if t.endswith(".png")]
    assert img, "README.md shows no picture"
    for target in img:
        path = (ROOT / target).resolve()
        assert path.is_file(), target
        assert path.stat().st_size < 150_000, f"{target}: {path.stat().st_size} bytes (keep it < 150 KB)"


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    broken = []
    for target in links(path):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_every_docs_page_is_in_the_index():
    index = DOCS / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index) if not is_external(t)}
    missing = [p.name for p in PAGES if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if not is_external(t)}
    missing = [p.name for p in PAGES if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


def _parsers(build) -> list[tuple[str, argparse.ArgumentParser]]:
    top = build()
    out = [(top.prog, top)]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += sorted(action.choices.items())
    return out


@pytest.mark.parametrize("module", ["spdsim.cli", "executor.cli"])
def test_help_names_an_existing_docs_page(module: str):
    cli = pytest.importorskip(module)
    for name, parser in _parsers(cli.build_parser):
        epilog = parser.epilog or ""
        m = re.search(r"docs/[\w.-]+\.md", epilog)
        assert m, f"{module} {name}: --help names no docs page (epilog {epilog!r})"
        assert (ROOT / m.group(0)).is_file(), f"{module} {name}: {m.group(0)} does not exist"
