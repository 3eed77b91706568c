#!/usr/bin/env bash
# One command from a fresh clone to a chat page:
#   ./start.sh                      set up .venv (first run), train the default model (first run,
#                                   about 5 minutes on 2 cores), then serve it with the web page
#   ./start.sh --model PATH         serve your own checkpoint or Hugging Face GPT-2 directory instead
#   ./start.sh [gpt-serve options]  anything else goes to gpt-serve (--port, --api-key, ...;
#                                   see .venv/bin/gpt-serve --help)
# The default model lives in runs/default; delete it to train again. An interrupted training run
# (Ctrl-C saves a checkpoint) resumes where it stopped on the next ./start.sh.
set -euo pipefail
cd "$(dirname "$0")"

say() { echo "start.sh: $*" >&2; }
elapsed() { local s=$((SECONDS - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

if [ ! -x .venv/bin/gpt-serve ]; then
    t=$SECONDS
    say "[1/3] setting up .venv (first run only, 1 to 3 minutes)"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    say "      installing torch (${TORCH_SPEC:-torch==2.13.0})"
    # The tested torch release; set TORCH_SPEC to pick another build (e.g. one for your CUDA).
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    say "      installing gpt-serve and its dependencies"
    .venv/bin/python -m pip install -q -e ".[dev]"
    say "      .venv is ready ($(elapsed $t))"
fi

has_model=0
for arg in "$@"; do
    case "$arg" in --model|--model=*) has_model=1 ;; esac
done
[ -n "${GPT_SERVE_MODEL:-}" ] && has_model=1

if [ "$has_model" = 0 ]; then
    RUN="${GPT_DEFAULT_RUN:-runs/default}"
    if [ ! -f "$RUN/DONE" ]; then
        t=$SECONDS
        if [ -e "$RUN/latest" ]; then
            say "[2/3] resuming the default model's training in $RUN"
            .venv/bin/gpt-train --out "$RUN" --resume
        else
            say "[2/3] training the default model on Python's standard library sources into $RUN"
            say "      (first run only: about 5 minutes on 2 cores, the bar below shows the time left;"
            say "      Ctrl-C saves a checkpoint and the next ./start.sh resumes)"
            # The gpt-code preset: a BPE learned from the corpus, 3 layers, 128 wide, context
            # 256 tokens. Its budget is counted in tokens, 4.9M (steps x batch x context),
            # because CPUs differ; benchmarks/first_run.py measured the choices (docs/benchmarks.md).
            .venv/bin/gpt-train --out "$RUN" --preset gpt-code --bpe-vocab 3072 \
                --batch-size 8 --max-iters "${GPT_DEFAULT_ITERS:-2400}" --lr 6e-3 --min-lr 6e-4 \
                --warmup 100 --eval-interval 800 --eval-iters 20
        fi
        say "      trained in $(elapsed $t)"
        touch "$RUN/DONE"
    fi
    set -- --model "$RUN/best" --served-model-name default "$@"
fi

say "[3/3] starting gpt-serve; open the URL it prints (the web page is at /, the API under /v1)"
exec .venv/bin/gpt-serve "$@"
