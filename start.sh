#!/usr/bin/env bash
# One command: set up a virtual environment with everything installed, then run the main job.
#   ./start.sh --model PATH "prompt"     stream a completion from a checkpoint or GPT-2 directory
# Any arguments are passed to gpt-generate (see ./start.sh --help once set up).
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/gpt-generate ]; then
    echo "setting up .venv (first run only)..." >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # The tested torch release; set TORCH_SPEC to pick another build (e.g. a CPU-only wheel).
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    .venv/bin/python -m pip install -q -e ".[dev]"
fi
exec .venv/bin/gpt-generate "$@"
