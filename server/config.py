"""Server settings: one dataclass, filled from `gpt-serve` options or `GPT_SERVE_*` variables.

Every field `name` can be set from the environment as `GPT_SERVE_<NAME>` (upper case), so a
container can be configured without a command line; explicit arguments win over the environment.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_PREFIX = "GPT_SERVE_"
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", *DTYPES)
QUANTIZATIONS = ("none", "int8")
SPECULATIVE_MODES = ("auto", "ngram", "draft", "off")
ROUTINGS = ("prefix", "round-robin")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@functools.lru_cache(maxsize=16)
def _run_name(model: str) -> str:
    """The served name of a model path, looked up once: it is asked for on every request, and
    finding a run's checkpoint stats the file system."""
    from gpt.checkpoint import run_name

    return run_name(model)


@dataclass
class Settings:
    model: str | None = None  # checkpoint directory or Hugging Face GPT-2 directory
    # the `model` clients send; default: the run's name (`default` for runs/default/best), else the
    # directory's
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* and /tokenize need `Authorization: Bearer <key>`
    max_batch_size: int = 32  # requests decoded together (KV-cache slots)
    max_queue: int = 128  # requests waiting for a slot before new ones get 429
    max_prompt_tokens: int | None = None  # longest prompt accepted; default: the model's context
    default_max_tokens: int = 256  # when a request gives no max_tokens
    timeout: float = 600.0  # seconds a request may take, queueing included
    drain_grace: float = 30.0  # seconds running requests get to finish after SIGTERM
    chat_template: str | None = None  # JSON file; default: the plain-text template
    device: str = "cpu"
    dtype: str | None = None  # None keeps the checkpoint's dtype
    # keys/values stored in this dtype; "auto": float16 where our attention kernel reads it, else
    # the model's (gpt.fast_defaults)
    kv_cache_dtype: str = "auto"
    quantize: str = "none"  # "int8": 8-bit weights and activations in every linear layer (gpt.quantize)
    prefix_cache: bool = True  # reuse cached keys/values of earlier prompts' common prefixes
    # torch.compile the decode step (gpt.compile_decode) at start-up; None: where a C++ compiler
    # is present on a CPU (gpt.fast_defaults)
    compile: bool | None = None
    # speculative decoding (gpt.speculative): "auto" drafts from requests' predictions and the
    # draft model (else prompt lookup) where the measured step costs say it is faster, "ngram"
    # and "draft" always, "off" never (predictions are then ignored); the output is the same in
    # every mode
    speculative: str = "auto"
    num_speculative_tokens: int = 32  # the longest draft of a sequence decoding alone (16 in a batch)
    draft_model: str | None = None  # a smaller GPT with the same tokenizer, drafting for the model
    eager: bool = False  # on a GPU, run the decode step eagerly instead of replaying CUDA graphs of it
    max_body_bytes: int = 2 * 1024 * 1024  # larger request bodies get 413 before they are read
    body_timeout: float = 30.0  # seconds a request body may take to arrive (408 after)
    constraint_timeout: float = 10.0  # seconds a structured-output constraint may take to compile (400 after)
    max_connections: int = 1024  # open connections at most; beyond that, new ones get 503
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    allowed_origins: str | None = None  # comma-separated origins allowed by CORS; default: none
    # Ray Serve (server/cluster): replicas of this server behind one endpoint; 0 is one process
    replicas: int = 0
    min_replicas: int | None = None  # with max_replicas: autoscale between them on requests in flight
    max_replicas: int | None = None
    cpus_per_replica: float | None = None  # default: the cluster's CPUs shared evenly between replicas
    # how requests pick a replica: "prefix" where their prompt's prefix is cached (unless that
    # replica is much busier), "round-robin" in turn
    routing: str = "prefix"
    docs: bool = True  # serve /docs, /redoc and /openapi.json (behind the API key when one is set)
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(0 <= self.port <= 65535, f"port must be in [0, 65535] (0: any free port), got {self.port}")
        need(self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}")
        need(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        need(
            self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
            f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}",
        )
        need(self.default_max_tokens >= 1, f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        need(self.timeout > 0, f"timeout must be > 0 seconds, got {self.timeout}")
        need(self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        need(self.body_timeout > 0, f"body_timeout must be > 0 seconds, got {self.body_timeout}")
        need(self.constraint_timeout > 0, f"constraint_timeout must be > 0 s, got {self.constraint_timeout}")
        need(self.max_connections >= 1, f"max_connections must be >= 1, got {self.max_connections}")
        need(
            self.keep_alive_timeout > 0,
            f"keep_alive_timeout must be > 0 seconds, got {self.keep_alive_timeout}",
        )
        need(self.drain_grace >= 0, f"drain_grace must be >= 0 seconds, got {self.drain_grace}")
        need(self.dtype is None or self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}",
        )
        need(
            self.quantize in QUANTIZATIONS, f"quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}"
        )
        need(
            self.speculative in SPECULATIVE_MODES,
            f"speculative must be one of {SPECULATIVE_MODES}, got {self.speculative!r}",
        )
        need(
            self.speculative != "draft" or self.draft_model is not None,
            "speculative 'draft' needs a draft model (--draft-model DIR)",
        )
        need(
            1 <= self.num_speculative_tokens <= 64,
            f"num_speculative_tokens must be in [1, 64], got {self.num_speculative_tokens}",
        )
        need(self.log_level in LOG_LEVELS, f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        need(self.replicas >= 0, f"replicas must be >= 0 (0: one process, no Ray), got {self.replicas}")
        need(
            self.min_replicas is None or self.max_replicas is not None,
            "min_replicas needs max_replicas (autoscaling between the two)",
        )
        need(
            self.min_replicas is None or self.min_replicas >= 1,
            f"min_replicas must be >= 1 (no scaling to zero), got {self.min_replicas}",
        )
        need(
            self.max_replicas is None or self.max_replicas >= max(1, self.min_replicas or 1, self.replicas),
            f"max_replicas must be >= 1, min_replicas and replicas, got {self.max_replicas}",
        )
        need(
            self.cpus_per_replica is None or self.cpus_per_replica > 0,
            f"cpus_per_replica must be > 0, got {self.cpus_per_replica}",
        )
        need(self.routing in ROUTINGS, f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        need(self.api_key is None or self.api_key != "", "api_key must not be empty (leave it unset instead)")

    @property
    def on_ray(self) -> bool:
        """Served by replicas on Ray Serve rather than by this process."""
        return self.replicas > 0 or self.max_replicas is not None

    @property
    def origins(self) -> list[str]:
        """The origins CORS lets call the API from a browser ("*": any)."""
        return [o.strip().rstrip("/") for o in (self.allowed_origins or "").split(",") if o.strip()]

    @property
    def model_name(self) -> str:
        """The name /v1/models lists and requests may use."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return _run_name(self.model)
        return "gpt"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from `GPT_SERVE_*` variables (ValueError names a bad one), then `overrides`."""
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = parse_field(f.name, raw)
            except ValueError as e:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {e}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_INT_FIELDS = {
    "port",
    "max_batch_size",
    "max_queue",
    "max_prompt_tokens",
    "default_max_tokens",
    "max_body_bytes",
    "max_connections",
    "num_speculative_tokens",
    "replicas",
    "min_replicas",
    "max_replicas",
}
_FLOAT_FIELDS = {
    "timeout",
    "drain_grace",
    "body_timeout",
    "constraint_timeout",
    "keep_alive_timeout",
    "cpus_per_replica",
}
_CHOICES = {
    "log_level": LOG_LEVELS,
    "quantize": QUANTIZATIONS,
    "dtype": DTYPES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "speculative": SPECULATIVE_MODES,
    "routing": ROUTINGS,
}
_BOOL_FIELDS = {"prefix_cache", "docs", "compile", "eager"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_field(name: str, raw: str):
    """Text (from the environment) to the field's type."""
    if name in _INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if name in _FLOAT_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if name in _BOOL_FIELDS:
        value = raw.lower()
        if value not in _TRUE + _FALSE:
            raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")
        return value in _TRUE
    if name in _CHOICES:
        value = raw.lower()
        if value not in _CHOICES[name]:
            raise ValueError(f"expected one of {', '.join(_CHOICES[name])}, got {raw!r}")
        return value
    return raw
