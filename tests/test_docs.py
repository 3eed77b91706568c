"""The README and the getting-started page work as written.

Their shell and Python examples run, in order, in a fresh copy of the repository (one per page),
except a block that an HTML comment right before it marks `<!-- not run: why -->` (it needs
minutes, the network, GPT-2 weights, a GPU or a running server). In every page of the docs, each
flag given to one of our commands must be one that command's `--help` lists, and each
`GPT_SERVE_*` variable one that `gpt-serve --help` names. The README stays short.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_PAGES = ["README.md", "docs/getting-started.md"]
ALL_PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 250

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
# `python -m X` and `torchrun ... -m X` run the same parsers as these commands; start.sh hands
# every option it does not take itself to gpt-serve.
MODULE_COMMANDS = {"training": "gpt-train", "server": "gpt-serve"}
SCRIPT_COMMANDS = {"start.sh": "gpt-serve"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given in a `<!-- not run: ... -->` comment, if any

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with the `not run` reason before each."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        before = next((s for s in reversed(lines[:start]) if s.strip()), "")
        reason = NOT_RUN.search(before)
        i += 1
        body = []
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])
        ):
            body.append(lines[i])
            i += 1
        found.append(Block(page, start + 1, lang, "\n".join(body), reason and reason.group(1)))
        i += 1
    return found


def page_blocks(page: str) -> list[Block]:
    return blocks((ROOT / page).read_text(encoding="utf-8"), page)


@functools.cache
def entry_points() -> dict[str, str]:
    """Our commands and their `module:function`, from pyproject.toml's [project.scripts]."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section.group(1), re.M))


@functools.cache
def help_text(command: str) -> str:
    """`command --help`, run in this process (the parsers are cheap; a subprocess per command
    would import torch each time)."""
    module, function = entry_points()[command].split(":")
    main = getattr(importlib.import_module(module), function)
    out, columns = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"  # no wrapping inside an option's name
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["--help"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    assert "usage:" in out.getvalue(), f"{command} --help printed no usage"
    return out.getvalue()


def logical_lines(code: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def invocations(code: str) -> list[tuple[str, list[str]]]:
    """Each (our command, the arguments after it) in a shell block, pipelines and lists split."""
    found, pending = [], ""
    for line in logical_lines(code):
        pending = f"{pending}\n{line}" if pending else line
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # a quoted string that goes on over the next line
            continue
        pending = ""
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token and all(c in "();<>|&" for c in token):
                found.extend(_command_in(segment))
                segment = []
            else:
                segment.append(token)
    assert not pending, f"unclosed quotation in a shell block: {pending!r}"
    return found


def _command_in(tokens: list[str]) -> list[tuple[str, list[str]]]:
    commands = entry_points()
    for i, token in enumerate(tokens):
        name = os.path.basename(token)
        if name in commands:
            return [(name, tokens[i + 1 :])]
        if name in SCRIPT_COMMANDS:
            return [(SCRIPT_COMMANDS[name], tokens[i + 1 :])]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULE_COMMANDS:
            return [(MODULE_COMMANDS[tokens[i + 1]], tokens[i + 2 :])]
    return []


def flags(args: list[str]) -> list[str]:
    """The options among a command's arguments (`--name`, `--name=value`, `-n`), not values such as
    `-1`."""
    return [a.split("=", 1)[0] for a in args if re.match(r"--?[A-Za-z]", a)]


def unknown_flags(block: Block) -> list[str]:
    problems = []
    for command, args in invocations(block.code):
        known = help_text(command)
        for flag in flags(args):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", known):
                problems.append(f"{block.where()}: {command} has no option {flag}")
    for variable in re.findall(r"\b(GPT_SERVE_[A-Z0-9_]+)=", block.code):
        if not re.search(rf"\b{variable}\b", help_text("gpt-serve")):
            problems.append(f"{block.where()}: gpt-serve reads no variable {variable}")
    return problems


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}"


def test_readme_links_point_at_files():
    """mkdocs checks the links between docs pages; the README's are checked here."""
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "the README links to no page"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_flag_in_the_docs_is_known():
    shell = [b for page in ALL_PAGES for b in page_blocks(page) if b.lang in SHELL]
    problems = [p for b in shell for p in unknown_flags(b)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should():
    """A made-up flag is reported, a `not run` comment is read, a fence of four backticks holds
    one of three."""
    page = (
        "<!-- not run: needs a server -->\n```bash\ngpt-chat --usage\n```\n\n"
        "````markdown\n```bash\n```\n````\n\n"
        "```bash\necho hi | gpt-generate --model m --no-such-flag -t 0 -n 5 \\\n    --seed 1 x\n```\n"
    )
    first, nested, last = blocks(page, "example.md")
    assert (first.not_run, first.lang, first.code) == ("needs a server", "bash", "gpt-chat --usage")
    assert nested.lang == "markdown" and nested.code == "```bash\n```"
    assert last.not_run is None
    assert invocations(last.code) == [
        ("gpt-generate", ["--model", "m", "--no-such-flag", "-t", "0", "-n", "5", "--seed", "1", "x"])
    ]
    assert unknown_flags(last) == ["example.md:11: gpt-generate has no option --no-such-flag"]
    assert invocations("torchrun --nproc_per_node 2 -m training --data d") == [("gpt-train", ["--data", "d"])]
    assert invocations("./start.sh --port 8080 # a comment --bogus") == [("gpt-serve", ["--port", "8080"])]


def _fresh_copy(dest: Path) -> None:
    """The repository as a fresh clone has it, without run directories: its top-level entries,
    linked."""
    dest.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "runs", "out", "site"}:
            (dest / entry.name).symlink_to(entry)


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_examples_run_as_written(page, tmp_path):
    to_run = [b for b in page_blocks(page) if b.lang in SHELL | PYTHON and b.not_run is None]
    assert to_run, f"{page} has no example that runs"
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / command).exists() for command in entry_points()):
        pytest.skip(f"our commands are not installed beside {sys.executable} (pip install -e .)")
    work = tmp_path / "clone"
    _fresh_copy(work)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for block in to_run:
        if block.lang in SHELL:
            argv = ["bash", "-euo", "pipefail", "-c", block.code]
        else:
            argv = [sys.executable, "-c", block.code]
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (
            f"{block.where()}: exit code {done.returncode}\n{block.code}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
