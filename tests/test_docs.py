"""The docs say only what can be run: every command they show names an entry point that exists and flags it
accepts, the README stays a short front page, and every relative link points at a file (and heading) that exists.

Commands are read from fenced and indented code blocks and from inline code in README.md and docs/*.md; a
command is any piece (split on `&&`, `;`, `|`) that starts with `python tune/...`, `python analysis/...`,
`python benchmarks/...`, `.venv/bin/python ...`, `python -m lmd...` or `lmd ...`. Each entry point's `--help`
runs once (in parallel, with a timeout) and each `--flag` must appear in it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LMD = Path(sys.executable).parent / "lmd"  # the console script of the venv running the tests
HELP_TIMEOUT = 120  # seconds for one `--help` (the Tune scripts import Ray)
README_MAX_LINES = 220
BANNED_README_WORDS = ("issue", "session", "lent")  # how the project was worked on is not the front page's business

FENCE = re.compile(r"^(`{3,}|~{3,})")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCRIPT_DIRS = ("tune/", "analysis/", "benchmarks/")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of every fenced block, every indented block (a blank line, then lines indented by
    four spaces) and every inline code span outside blocks."""
    out: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []
    fence: str | None = None
    block: list[str] = []
    start = 0
    indented = False  # inside an indented block
    previous_blank = True
    for number, line in enumerate(text.splitlines(), 1):
        marker = FENCE.match(line.lstrip())
        if fence is not None:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                out.append((start, "\n".join(block)))
                fence, block = None, []
            else:
                block.append(line)
            continue
        if indented and not line.startswith("    ") and line.strip():
            out.append((start, "\n".join(block)))
            indented, block = False, []
        if marker:
            fence, start, block = marker.group(1), number + 1, []
        elif indented:
            block.append(line[4:])
        elif line.startswith("    ") and previous_blank:
            indented, start, block = True, number, [line[4:]]
        else:
            prose.append((number, line))
        previous_blank = not line.strip()
    if indented or fence is not None:
        out.append((start, "\n".join(block)))
    joined = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    for match in INLINE.finditer(joined):
        out.append((numbers[joined.count("\n", 0, match.start())], match.group(1)))
    return out


def join_continuations(text: str) -> list[tuple[int, str]]:
    """Logical lines (offset, text): backslash continuations joined, comments dropped."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for offset, raw in enumerate(text.splitlines()):
        line = re.sub(r"(^|\s)#(?!\!).*$", "", raw).rstrip()  # `# comment`; a `#` inside a word stays
        if not pending:
            first = offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def pieces(line: str) -> list[str]:
    """The separate commands of a shell line: split on &&, ;, | and on a ` -- ` that hands over to a command."""
    parts = re.split(r"\s*(?:&&|\|\||;|\|)\s*", line)
    out = []
    for part in parts:
        out.extend(re.split(r"\s--\s+(?=(?:lmd|python|\.venv/bin/python)\s)", part))
    return [p.strip() for p in out if p.strip()]


def entry_point(words: list[str]) -> tuple[str, ...] | None:
    """The entry point a command runs, as a key: ("script", path), ("lmd", subcommand) or None if not ours."""
    while words and ENV_ASSIGN.match(words[0]):
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if head in ("python", "python3", ".venv/bin/python"):
        if len(words) < 2:
            return None
        if words[1] == "-m" and len(words) > 2 and words[2].split(".")[0] == "lmd":
            return ("module", words[2], *_subcommand(words[3:]))
        target = words[1]
        if head == "python" and not target.startswith(SCRIPT_DIRS):
            return None
        if target.startswith("-"):
            return None
        return ("script", target)
    if head == "lmd":
        return ("lmd", *_subcommand(words[1:]))
    return None


def _subcommand(words: list[str]) -> tuple[str, ...]:
    """The first word when it names a subcommand (`lmd train`); none for a flag or a prose `lmd ...`."""
    return (words[0],) if words and not words[0].startswith("-") and words[0] != "..." else ()


def commands() -> list[tuple[Command, tuple[str, ...], list[str]]]:
    found = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for start, block in code_blocks(page.read_text(encoding="utf-8")):
            for offset, line in join_continuations(block):
                for piece in pieces(line):
                    try:
                        words = shlex.split(piece)
                    except ValueError:
                        words = piece.split()
                    key = entry_point(words)
                    if key is None:
                        continue
                    flags = FLAG.findall(piece)
                    found.append((Command(rel, start + offset, piece), key, flags))
    return found


@cache
def help_text(key: tuple[str, ...]) -> tuple[int | None, str]:
    """(exit code, output) of the entry point's --help; exit code None when it does not exist or timed out."""
    if key[0] == "script":
        script = ROOT / key[1]
        if not script.is_file():
            return None, f"{key[1]}: no such file"
        argv = [sys.executable, str(script), "--help"]
    elif key[0] == "lmd":
        if not LMD.is_file():
            return None, f"{LMD}: the lmd console script is not installed"
        argv = [str(LMD), *key[1:], "--help"]
    else:
        argv = [sys.executable, "-m", key[1], *key[2:], "--help"]
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=HELP_TIMEOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(argv)}: --help took over {HELP_TIMEOUT} s"
    return done.returncode, done.stdout + done.stderr


ALL = commands()


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], tuple[int | None, str]]:
    keys = sorted({key for _, key, _ in ALL})
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(keys, pool.map(help_text, keys), strict=True))


def test_docs_show_commands_to_check() -> None:
    """The extraction finds the README's main commands (a broken extractor would check nothing)."""
    keys = {key for _, key, _ in ALL}
    assert ("script", "tune/ablation.py") in keys
    assert ("script", "tune/search.py") in keys
    assert ("lmd", "train") in keys


@pytest.mark.parametrize("command,key,flags", ALL, ids=[f"{c.page}:{c.line}" for c, _, _ in ALL])
def test_command_runs_an_entry_point_that_takes_its_flags(command: Command, key: tuple[str, ...], flags: list[str],
                                                          helps: dict[tuple[str, ...], tuple[int | None, str]]) -> None:
    code, text = helps[key]
    where = f"{command.page}:{command.line}: {command.text}"
    assert code == 0, f"{where}\n  its entry point fails --help:\n{text[-2000:]}"
    accepted = set(FLAG.findall(text))
    unknown = [f for f in flags if f not in accepted and f != "--help"]
    assert not unknown, f"{where}\n  flags not in `{' '.join(key[1:])} --help`: {', '.join(unknown)}"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    readme_lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    assert ci in readme_lines, f"README.md does not show .ci/run's command byte for byte: {ci}"


def test_readme_is_a_short_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("word", BANNED_README_WORDS)
def test_readme_does_not_say(word: str) -> None:
    text = README.read_text(encoding="utf-8")
    hits = [n for n, line in enumerate(text.splitlines(), 1) if re.search(rf"\b{word}\b", line, re.IGNORECASE)]
    assert not hits, f"README.md says {word!r} on line(s) {hits}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fence = not fence
            continue
        match = None if fence else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return frozenset(out)


def links() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        fence = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if FENCE.match(line.lstrip()):
                fence = not fence
                continue
            if fence:
                continue
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
                    continue
                out.append((rel, number, target))
    return out


@pytest.mark.parametrize("page,line,target", links(), ids=[f"{p}:{n}" for p, n, _ in links()])
def test_relative_link_points_at_a_file(page: str, line: int, target: str) -> None:
    path, _, anchor = target.partition("#")
    source = ROOT / page
    file = (source.parent / path).resolve() if path else source
    assert file.exists(), f"{page}:{line}: link {target!r}: {file} does not exist"
    if anchor and file.suffix == ".md":
        known = anchors(file)
        assert anchor in known, (f"{page}:{line}: link {target!r}: no heading with anchor #{anchor} in "
                                 f"{path or page} (its anchors: {', '.join(sorted(known))})")
