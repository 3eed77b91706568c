"""Everything a training run needs to know, in one dataclass that is saved with its checkpoints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import gpt

DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_KINDS = ("gpt", "seq2seq")
DATA_FORMATS = ("auto", "text", "chat")
DEFAULT_PRESET = {"gpt": "gpt-mini", "seq2seq": "seq2seq-mini"}
# Model-shape fields the command line can override; None keeps the preset's (or checkpoint's) value.
EVAL_ITERS = 100  # validation batches per evaluation, at most, unless --eval-iters says otherwise
# With --init-from the loaded model's shape is fixed: block_size is then the training sequence
# length (at most the model's context), dropout may change, the others must match.
MODEL_FIELDS = ("n_layer", "n_encoder_layer", "n_head", "n_embd", "block_size", "dropout")


class ConfigError(ValueError):
    """A bad setting; the CLI prints it as one line and exits with code 2."""


@dataclass
class TrainConfig:
    # what to train
    model: str = "gpt"  # gpt | seq2seq
    preset: str | None = None  # default: gpt-mini / seq2seq-mini
    n_layer: int | None = None
    n_encoder_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    tokenizer: str | None = None  # default: the preset's
    bpe_vocab: int = 4096  # --tokenizer bpe: ids in the tokenizer trained on the data
    init_from: str | None = None  # fine-tune from a checkpoint / Hugging Face GPT-2 directory
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the whole model (needs init_from)
    lora_alpha: float | None = None  # adapter scale alpha / rank; default 2 x rank
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # layer names to adapt; default: attention and MLP projections
    lora_bias: bool = False  # train every bias too
    # data
    data: list[str] = field(default_factory=list)  # empty: stdlib sources (gpt) / date task (seq2seq)
    val_fraction: float = 0.1
    val_data: list[str] = field(default_factory=list)  # validation from these files instead of a split
    format: str = "auto"  # auto | text | chat (conversations, training.chats); auto: chat .jsonl -> chat
    chat_template: str | None = None  # chat: a JSON template file as gpt-serve's; None: the default
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    max_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 5  # consecutive non-finite steps (skipped) before the run stops
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int | None = None  # None: eval_batches() picks, by the training between evaluations
    eval_pairs: int = 200  # seq2seq: held-out pairs for exact-match accuracy
    num_beams: int = 4  # seq2seq: beam width for the beam-search accuracy
    sample_prompts: list[str] | None = None  # continued at each evaluation; None: a default per model kind
    sample_tokens: int = 48  # new tokens per sample; 0: no samples
    tensorboard: str | None = None  # a directory for TensorBoard event files
    log_interval: int = 10
    keep_last: int = 3  # step checkpoints kept besides best/
    out: str = "runs/train"
    # runtime
    dtype: str = "auto"  # bfloat16 where the CPU has it and it measures faster (training.precision)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute block activations in backward (gpt.checkpointing)
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int = 0  # CPU threads per process; 0 = the cores this process may use / ranks
    quiet: bool = False

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(
            self.model in MODEL_KINDS, f"--model must be one of {', '.join(MODEL_KINDS)}, got {self.model!r}"
        )
        if self.preset is not None:
            need(
                self.preset in gpt.PRESETS,
                f"unknown preset {self.preset!r}; choose one of {', '.join(gpt.PRESETS)}",
            )
        for name in ("n_layer", "n_head", "n_embd", "block_size", "n_encoder_layer"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
        need(
            self.dropout is None or 0.0 <= self.dropout < 1.0,
            f"--dropout must be in [0, 1), got {self.dropout}",
        )
        need(
            self.format in DATA_FORMATS,
            f"--format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}",
        )
        need(self.format != "chat" or self.model == "gpt", "--format chat trains a GPT: pass --model gpt")
        need(0.0 < self.val_fraction < 1.0, f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in (
            "batch_size",
            "grad_accum",
            "max_iters",
            "eval_interval",
            "log_interval",
            "keep_last",
            "eval_pairs",
            "num_beams",
            "max_bad_steps",
        ):
            v = getattr(self, name)
            need(v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
        need(
            self.eval_iters is None or self.eval_iters >= 1,
            f"--eval-iters must be >= 1, got {self.eval_iters}",
        )
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr={self.lr}], got {self.min_lr}")
        need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(257 <= self.bpe_vocab <= 65536, f"--bpe-vocab must be in [257, 65536], got {self.bpe_vocab}")
        need(self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        need(self.lora_rank >= 0, f"--lora-rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank:
            need(self.init_from is not None, "--lora-rank adapts a trained model: pass --init-from PATH")
        else:
            for name in ("lora_alpha", "lora_targets"):
                need(getattr(self, name) is None, f"--{name.replace('_', '-')} needs --lora-rank")
            need(
                not self.lora_bias and not self.lora_dropout,
                "--lora-bias and --lora-dropout need --lora-rank",
            )
        need(
            self.sample_tokens >= 0,
            f"--sample-tokens must be >= 0 (0 = no samples), got {self.sample_tokens}",
        )

    def train_length(self, context: int) -> int:
        """Tokens per training and validation sequence for a model with `context` positions (the
        seq2seq source and target limit too): --block-size with --init-from, else the context."""
        if self.init_from and self.block_size is not None:
            return self.block_size
        return context

    def eval_batches(self) -> int:
        """Validation batches per evaluation: --eval-iters, or by default EVAL_ITERS but never
        more than the training micro-batches between two evaluations. A validation batch is one
        forward pass, about a third of a training micro-batch's forward and backward, so a short
        run (--max-iters 2) spends at most about a third as long evaluating as training."""
        if self.eval_iters is not None:
            return self.eval_iters
        return max(1, min(EVAL_ITERS, min(self.eval_interval, self.max_iters) * self.grad_accum))

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what was meant."""
        out = []
        if self.warmup >= self.max_iters:
            peak = get_lr(self.max_iters - 1, self)
            out.append(
                f"warning: --warmup {self.warmup} is not shorter than --max-iters {self.max_iters}: "
                f"the learning rate only climbs to {peak:.2g} (--lr {self.lr:g}) and never decays; "
                f"pass a smaller --warmup, e.g. {self.max_iters // 10}"
            )
        return out

    def model_config(self, vocab_size: int, tokenizer: str, eot: int | None = None) -> gpt.ModelConfig:
        """The model to build: the preset with the command line's overrides. eot: the
        tokenizer's end-of-text id, which a seq2seq decoder starts from."""
        name = self.preset or DEFAULT_PRESET[self.model]
        base = dict(gpt.PRESETS[name])
        if base["arch"] != self.model:
            raise ConfigError(f"preset {name!r} is a {base['arch']} model, not {self.model}")
        overrides = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        if self.model == "gpt":
            if overrides.pop("n_encoder_layer", None) is not None:
                raise ConfigError("--n-encoder-layer only applies to --model seq2seq")
        elif eot is not None and base.get("decoder_start_token") is None:
            overrides["decoder_start_token"] = eot  # explicit: a trained tokenizer has no name to look up
        try:
            return gpt.ModelConfig(**{**base, **overrides, "vocab_size": vocab_size, "tokenizer": tokenizer})
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters (nanoGPT's schedule)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    if step >= cfg.max_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup) / max(1, cfg.max_iters - cfg.warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
