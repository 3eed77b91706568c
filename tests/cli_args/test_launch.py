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

import pytest

from cli_args import unescape

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(command: str, *args: str) -> list[str]:
    code = f"import sys; from cli_args.launch import {command}; sys.argv[1:] = {list(args)!r}; "
    code += f"sys.exit({command}())"
    return [sys.executable, "-c", code]


def test_gpt_generate_help_answers_without_importing_torch():
    code = (
        "import sys\nfrom cli_args.launch import generate\nsys.argv[1:] = ['--help']\n"
        "try:\n    generate()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "--json-schema" in out.stdout and out.stdout.strip().endswith("False")


@pytest.mark.parametrize("command, args", [("generate", ["hi"]), ("serve", [])])
def test_ctrl_c_while_torch_loads_is_one_line_and_exit_130(command, args, tmp_path):
    proc = subprocess.Popen(
        launch(command, "--model", str(tmp_path / "none"), *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # inside `import torch` (seconds), after the interpreter has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted")


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
