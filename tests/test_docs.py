"""The README and docs/ stay true to the checkout: every relative link reaches a file (and a
heading, when it names one), and every `cfiw ...` command line they show names a command
that exists and only flags that command accepts."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from cfiw_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# `cfiw SUB ...` at the start of a code line or span, after a path (`.venv/bin/cfiw`), or
# after a shell separator; prose that mentions cfiw inside code (`another cfiw process`) is not one
COMMAND = re.compile(r"(?:^\s*|/|(?:&&|;|\||\$|\bdo|\bthen)\s+)cfiw ((?:--?)?[a-z][\w-]*)(.*)")
SHELL_ENDS = re.compile(r"\s(?:#|\||&&|;|>|2>)\s.*$|[;)]$")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(page: Path) -> set[str]:
    found, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"#{1,6} (.*)", line)):
            found.add(slug(match.group(1)))
    return found


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", target)]


def code_lines(page: Path) -> list[str]:
    """The page's code: every line of a fenced block (continued lines joined), every inline span."""
    lines, fence, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            pending += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                lines.append(pending.strip())
                pending = ""
        else:
            lines += re.findall(r"`([^`]+)`", line)
    return lines


def shown_commands(page: Path) -> list[tuple[str, list[str]]]:
    shown = []
    for line in code_lines(page):
        for match in COMMAND.finditer(line):
            rest = SHELL_ENDS.sub("", match.group(2))
            try:
                words = shlex.split(rest)
            except ValueError:  # a fragment with one quote of a pair
                words = rest.split()
            shown.append((match.group(1), words))
    return shown


def accepted_flags(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help", "-h"}


def test_every_page_is_checked():
    assert {p.name for p in PAGES} >= {
        "README.md",
        "commands.md",
        "method.md",
        "testbed.md",
        "performance.md",
        "reliability.md",
        "scale.md",
        "architecture.md",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(target)
        elif anchor and destination.suffix == ".md" and anchor not in headings(destination):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_parses(page):
    group = typer.main.get_command(app)
    shown = shown_commands(page)
    wrong = []
    for name, words in shown:
        if name.startswith("-"):
            command, flags = group, [name, *words]
        elif name in group.commands:
            command, flags = group.commands[name], words
        else:
            wrong.append(f"cfiw {name}: no such command")
            continue
        accepted = accepted_flags(command)
        for word in flags:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--?[a-z][\w-]*", flag) and flag not in accepted:
                wrong.append(f"cfiw {name}: {flag}")
    assert wrong == []
    if page.name in ("README.md", "commands.md"):
        assert len(shown) >= 10  # the pages that teach the commands do show them


def test_the_checks_see_a_broken_link_and_a_stale_flag(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\nSee [there](missing.md), [here](#title) and [gone](#nowhere).\n\n"
        "```bash\ncfiw train --model m \\\n    --no-such-flag 3\n```\n"
    )
    assert [t for t in links(page) if not (page.parent / t.partition("#")[0]).exists()] == ["missing.md"]
    assert "title" in headings(page) and "nowhere" not in headings(page)
    assert shown_commands(page) == [("train", ["--model", "m", "--no-such-flag", "3"])]
    train = typer.main.get_command(app).commands["train"]
    assert "--no-such-flag" not in accepted_flags(train) and "--model" in accepted_flags(train)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_block_is_closed(page):
    """An unclosed fence turns the rest of the page into code (and hides its links from the checks)."""
    fences = [line for line in page.read_text().splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0
    assert all(opening != "```" or closing == "```" for opening, closing in zip(fences[::2], fences[1::2], strict=True))
