# gpt-serve: the OpenAI-compatible server with its chat page at /.
#   docker build -t gpt-serve .
#   docker run -p 8000:8000 -v "$PWD/models:/models" -e GPT_SERVE_MODEL=/models/default gpt-serve
# CPU torch by default (a ~200 MB wheel instead of ~2.5 GB of CUDA libraries). For a GPU image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t gpt-serve:cuda .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is the big one and changes least often.
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gpt ./gpt
COPY server ./server
COPY training ./training
COPY client ./client
COPY cli_args ./cli_args
# torch is already satisfied, so this adds only the small dependencies.
# EXTRAS=ray builds the image KubeRay runs (deploy/ray/rayservice.yaml): gpt-serve[ray]
ARG EXTRAS=""
RUN pip install ".${EXTRAS:+[$EXTRAS]}"

# Run as a normal user. /models is created here, owned by that user, so that a named volume
# mounted there starts out writable (Docker copies the directory's ownership into a new volume).
RUN useradd --create-home --uid 1000 app && mkdir -p /models && chown app:app /models
USER app
WORKDIR /home/app

ENV GPT_SERVE_HOST=0.0.0.0 \
    GPT_SERVE_PORT=8000
EXPOSE 8000

# The slim image has no curl: ask /health with Python's standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GPT_SERVE_PORT', '8000'), timeout=4)"]

# CMD rather than ENTRYPOINT, so `docker run IMAGE gpt-train ...` (the compose train profile) works.
CMD ["gpt-serve", "--host", "0.0.0.0"]
