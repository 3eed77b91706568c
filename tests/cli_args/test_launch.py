"""The commands' entry points (cli_args.launch): Ctrl-C at start-up is one line and exit 130, a
prompt read from a terminal is announced, `gpt-generate --help` needs no torch, and stop strings
read escapes the same way everywhere."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_args import unescape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(command: str, *args: str) -> list[str]:
    """The command as its entry point runs it; it writes "ready" on stderr just before."""
    code = f"import sys; from cli_args.launch import {command}; sys.argv[1:] = {list(args)!r}; "
    code += f"sys.stderr.write('ready\\n'); sys.stderr.flush(); sys.exit({command}())"
    return [sys.executable, "-c", code]


def test_gpt_generate_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom cli_args.launch import generate\nsys.argv[1:] = ['--help']\n"
        "try:\n    generate()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "--json-schema" in out.stdout and out.stdout.strip().endswith("False")


def _sigint_default() -> None:
    """In the child: SIGINT as a shell leaves it (a test worker may have it ignored or blocked)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_while_a_command_loads_is_one_line_and_exit_130(tmp_path):
    # a command whose import takes as long as torch's can (a minute here): Ctrl-C lands inside it
    (tmp_path / "slow_start.py").write_text(
        "import time\ntime.sleep(60)\n\ndef main(argv=None):\n    return 0\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from cli_args.launch import _run; "
        "sys.stderr.write('ready\\n'); sys.stderr.flush(); sys.exit(_run('slow_start', 'gpt-x', None))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default
    )
    assert proc.stderr.readline() == "ready\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "gpt-x: interrupted"


def test_every_command_starts_through_the_launcher():
    import re

    text = (Path(ROOT) / "pyproject.toml").read_text(encoding="utf-8")
    scripts = dict(re.findall(r'^(gpt-[\w-]+) = "([\w.:]+)"', text, re.M))
    assert set(scripts) == {"gpt-generate", "gpt-train", "gpt-serve", "gpt-chat", "gpt-eval"}
    assert all(target.startswith("cli_args.launch:") for target in scripts.values())


def test_a_prompt_read_from_a_terminal_is_announced_at_once(tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        launch("generate", "--model", str(tmp_path / "none")),
        cwd=ROOT,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    try:
        assert proc.stderr.readline() == "ready\n"
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready, "nothing said while waiting for the prompt"
        assert "reading the prompt from standard input" in proc.stderr.readline()
        os.write(master, b"\x04")  # Ctrl-D: an empty prompt
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "the prompt is empty" in err
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "typed, meant",
    [("\\n\\n", "\n\n"), ("a\\tb\\r", "a\tb\r"), ("x\\\\n", "x\\n"), ("\\q", "\\q"), ("end\\", "end\\")],
)
def test_stop_strings_read_backslash_escapes(typed, meant):
    assert unescape(typed) == meant
