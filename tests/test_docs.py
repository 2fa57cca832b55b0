"""The docs a user reads: a short README with the quick start first, true exit codes, every command, no dead links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import ExitCode

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
DOCS = sorted([README, *(PROJECT / "docs").rglob("*.md")])

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def _prose(path: Path) -> list[str]:
    """Return the lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """Return the anchors GitHub makes from a markdown file's headings."""
    anchors = set()
    for line in _prose(path):
        if heading := re.match(r"#{1,6}\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", heading[1].strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def _links() -> list[tuple[Path, str]]:
    """Return (file, target) for every relative link in the README and docs/."""
    found = []
    for path in DOCS:
        for line in _prose(path):
            text = re.sub(r"`[^`]*`", "", line)  # code spans are not links
            found += [(path, t) for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    return found


def _readme_section(title: str) -> list[str]:
    lines = _prose(README)
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1 : end]


def _exit_codes() -> dict[str, int]:
    """Return ExitCode's names and values, whether it is a plain class or an IntEnum."""
    members = getattr(ExitCode, "__members__", None)
    items = members.items() if members is not None else vars(ExitCode).items()
    return {name: int(value) for name, value in items if not name.startswith("_") and isinstance(value, int)}


def _commands(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Return the commands `build.py --help` lists (the CLI's command table, as users see it)."""
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("commands:")
    block = lines[start + 1 : lines.index("", start)]
    return [line.split()[0] for line in block]


def test_readme_is_short_and_starts_with_the_quick_start() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move detail into docs/"
    sections = [line for line in _prose(README) if line.startswith("## ")]
    assert sections[0] == "## Quick start"
    # The two commands, as lines of the quick start's code block (CI's .ci/run runs the second).
    text = README.read_text(encoding="utf-8")
    block = text[text.index("## Quick start") : text.index(sections[1])]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("./")]
    assert commands == ["./scripts/try.sh", "./scripts/test.sh"]


def test_every_relative_link_resolves() -> None:
    dead = []
    for path, target in _links():
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            dead.append(f"{path.relative_to(PROJECT)}: {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            dead.append(f"{path.relative_to(PROJECT)}: {target}: no such heading")
    assert not dead, "\n".join(dead)


def test_readme_exit_codes_match_exitcode() -> None:
    table = {}
    for line in _readme_section("Exit codes"):
        if row := re.match(r"\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|", line):
            table[row[2]] = int(row[1])
    assert table == _exit_codes()


def test_readme_shows_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands(capsys)
    assert len(commands) >= 10, commands  # the help's command list was found
    text = README.read_text(encoding="utf-8")
    missing = [c for c in commands if not re.search(rf"build\.py {re.escape(c)}\b", text)]
    assert not missing, f"README.md has no example of: {', '.join(missing)}"
    assert re.search(r"build\.py sandbox env\b", text)
