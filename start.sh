#!/usr/bin/env bash
# One command from a fresh clone to a chat page:
#   ./start.sh                      set up .venv (first run), train the default model (first run,
#                                   a few minutes on 2 cores), then serve it with the chat page
#   ./start.sh --model PATH         serve your own checkpoint or Hugging Face GPT-2 directory instead
#   ./start.sh [gpt-serve options]  anything else goes to gpt-serve (--port, --api-key, ...;
#                                   see .venv/bin/gpt-serve --help)
# The default model lives in runs/default; delete it to train again. An interrupted training run
# (Ctrl-C saves a checkpoint) resumes where it stopped on the next ./start.sh.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/gpt-serve ]; then
    echo "setting up .venv (first run only)..." >&2
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # The tested torch release; set TORCH_SPEC to pick another build (e.g. one for your CUDA).
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    .venv/bin/python -m pip install -q -e ".[dev]"
fi

has_model=0
for arg in "$@"; do
    case "$arg" in --model|--model=*) has_model=1 ;; esac
done
[ -n "${GPT_SERVE_MODEL:-}" ] && has_model=1

if [ "$has_model" = 0 ]; then
    RUN="${GPT_DEFAULT_RUN:-runs/default}"
    if [ ! -f "$RUN/DONE" ]; then
        if [ -e "$RUN/latest" ]; then
            echo "resuming the default model's training in $RUN..." >&2
            .venv/bin/gpt-train --out "$RUN" --resume
        else
            echo "training the default model on Python's standard library sources into $RUN" >&2
            echo "(first run only, a few minutes on 2 cores; Ctrl-C saves and the next run resumes)" >&2
            # A byte-level GPT: small enough to learn something readable in minutes on a CPU.
            .venv/bin/gpt-train --out "$RUN" --preset gpt-char --tokenizer byte \
                --n-layer 4 --n-head 4 --n-embd 192 --block-size 256 --dropout 0.0 \
                --batch-size 8 --max-iters "${GPT_DEFAULT_ITERS:-1200}" --lr 2e-3 --min-lr 2e-4 \
                --warmup 100 --eval-interval 200 --eval-iters 50
        fi
        touch "$RUN/DONE"
    fi
    set -- --model "$RUN/best" --served-model-name default "$@"
fi

exec .venv/bin/gpt-serve "$@"
