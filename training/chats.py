"""Conversations for a GPT: OpenAI's fine-tuning format, one {"messages": [{"role", "content"},
...]} per line of a .jsonl file, rendered with the chat template gpt-serve uses
(server.chat_template), trained with the loss on the assistant's tokens only.

A conversation is one row of a batch, right-padded with end-of-text ids to the longest row of
the batch (rounded up to a multiple of PAD_MULTIPLE, at most the block): padding and every token
that is not the assistant's gets the target IGNORE (-100), which the loss skips. Rows are not
packed together: with causal attention a row's padding, which comes after it, cannot change
what its tokens see, whereas packing several conversations into one row would need a
block-diagonal attention mask the model does not take.

Which tokens are the assistant's: what the model writes when gpt-serve prompts it, i.e. the
assistant turn's prefix after the template's generation prompt (" " for the default template's
"Assistant: " after "Assistant:"), the content and the suffix (the newline that ends the turn, so
the model learns to stop). An assistant message with "weight": 0 is context, not trained on."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.evaluate import IGNORE
from gpt.tokenizer import Tokenizer
from server.chat_template import ChatTemplate, load_chat_template

from .config import ConfigError
from .data import find_files

MAX_BAD_FRACTION = 0.10  # more bad lines than this (or no good one) stops the run
SHOWN_BAD = 5  # bad lines listed by number in the report
PAD_MULTIPLE = 16  # rows are padded to a multiple of this: few distinct shapes for --compile

Example = tuple[list[int], list[int]]  # (token ids, targets: the next id, or IGNORE)


class BadLine(ValueError):
    """One line of a chat file that cannot be trained on; the message says why."""


def looks_like_chats(path: Path) -> bool:
    """A .jsonl file whose first non-blank line is a JSON object with "messages"."""
    if path.suffix.lower() != ".jsonl":
        return False
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "messages" in obj
    except (OSError, ValueError):
        return False
    return False


def is_chat_run(cfg) -> bool:
    """--format chat, or --format auto with every --data file a chat .jsonl."""
    if cfg.format == "chat":
        return True
    if cfg.format != "auto" or cfg.model != "gpt" or not cfg.data:
        return False
    return all(looks_like_chats(f) for f in find_files(cfg.data))


def template_for(cfg) -> ChatTemplate:
    try:
        return load_chat_template(cfg.chat_template)
    except ValueError as e:
        raise ConfigError(f"--chat-template {e}") from None


def _messages(line: str) -> list[tuple[str, str, bool]]:
    try:
        obj = json.loads(line)
    except ValueError:
        raise BadLine("not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise BadLine('no "messages" list')
    out = []
    for m in obj["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadLine('a message without a "role"')
        if not isinstance(m.get("content"), str):
            raise BadLine(f'a {m["role"]!r} message whose "content" is not a string')
        out.append((m["role"], m["content"], m["role"] == "assistant" and m.get("weight", 1) != 0))
    if not any(m[0] == "assistant" for m in out):
        raise BadLine("no assistant turn")
    return out


def render(
    template: ChatTemplate, messages: list[tuple[str, str, bool]]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template lays it out (no generation prompt), and the character
    spans the model is trained to write."""
    text, spans = template.bos, []
    gen = template.generation_prompt
    for role, content, trained in messages:
        try:
            fmt = template.format_for(role)
        except ValueError as e:
            raise BadLine(str(e)) from None
        start = len(text)
        if trained and role == "assistant":
            # gpt-serve's prompt ends with the generation prompt; what follows it is the model's
            skip = len(gen) if gen and fmt.prefix.startswith(gen) else len(fmt.prefix)
            spans.append((start + skip, start + len(fmt.prefix) + len(content) + len(fmt.suffix)))
        text += fmt.prefix + content + fmt.suffix
    return text, spans


def encode(template: ChatTemplate, tok: Tokenizer, messages: list[tuple[str, str, bool]]) -> Example:
    """Token ids of the rendered conversation and their targets: ids[i + 1] where that token
    starts inside an assistant span, IGNORE elsewhere. The whole text is tokenized at once, as
    the server tokenizes its prompt, and token starts are found from each token's bytes."""
    text, spans = render(template, messages)
    ids = tok.encode(text)
    byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    starts, pos = [], 0
    for t in ids:
        starts.append(pos)
        pos += len(tok.token_bytes(t))
    trained = [any(a <= s < b for a, b in byte_spans) for s in starts]
    targets = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)]
    if all(t == IGNORE for t in targets):
        raise BadLine("no assistant tokens to train on")
    return ids[:-1], targets


@dataclass
class ChatFile:
    examples: list[Example]
    lines: int  # non-blank lines
    bad: list[tuple[int, str]]  # (line number, why)


def read_chats(path: Path, template: ChatTemplate, tok: Tokenizer, block_size: int) -> ChatFile:
    examples, bad, lines = [], [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                x, y = encode(template, tok, _messages(line))
                if len(x) > block_size:
                    raise BadLine(f"{len(x) + 1} tokens, longer than the block ({block_size})")
            except BadLine as e:
                bad.append((n, str(e)))
                continue
            examples.append((x, y))
    return ChatFile(examples, lines, bad)


def load_chat_files(specs: list[str], option: str, template, tok, block_size: int) -> tuple[list, list[str]]:
    """Every good conversation of the files, and a note per file with bad lines; too many bad
    lines (or no good one) is a ConfigError."""
    examples, notes = [], []
    for path in find_files(specs, option):
        got = read_chats(path, template, tok, block_size)
        examples += got.examples
        if not got.bad:
            continue
        shown = "; ".join(f"line {n}: {why}" for n, why in got.bad[:SHOWN_BAD])
        more = f"; and {len(got.bad) - SHOWN_BAD} more" if len(got.bad) > SHOWN_BAD else ""
        note = f"{option} {path}: {len(got.bad)} of {got.lines} lines are bad ({shown}{more})"
        if not got.examples or len(got.bad) > MAX_BAD_FRACTION * got.lines:
            raise ConfigError(f"{note}; more than {MAX_BAD_FRACTION:.0%} bad, stopping")
        notes.append(note + ", skipped")
    return examples, notes


def collate(rows: list[Example], pad: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """(x, y, lengths): the rows right-padded to the longest (rounded up to PAD_MULTIPLE, at most
    block_size), and each row's own length, so that throughput counts tokens, not padding."""
    longest = max(len(x) for x, _ in rows)
    width = min(block_size, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(targets)] = torch.tensor(targets)
    return x, y, torch.tensor([len(ids) for ids, _ in rows])


class ChatSampler:
    """Random batches of whole conversations, with a saveable generator (exact resume)."""

    def __init__(self, examples: list[Example], block_size: int, batch_size: int, seed: int, pad: int):
        self.examples, self.block_size, self.batch_size, self.pad = examples, block_size, batch_size, pad
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        ix = torch.randint(len(self.examples), (self.batch_size,), generator=self.generator).tolist()
        return collate([self.examples[i] for i in ix], self.pad, self.block_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def sample_prompt(example: Example, tok: Tokenizer) -> str:
    """A conversation's text up to where the model first answers (the template's generation
    prompt, as gpt-serve prompts it): what the run's samples continue."""
    ids, targets = example
    first = next((i for i, t in enumerate(targets) if t != IGNORE), len(ids) - 1)
    return tok.decode(ids[: first + 1])


def build_chat_data(cfg, tok: Tokenizer, block_size: int, seed: int, is_main: bool = True):
    """A chat run's training sampler, validation sampler maker (seed -> sampler), description,
    and the prompt and stop strings of its samples (the first validation conversation, rendered
    and stopped as gpt-serve's /v1/chat/completions would): the conversations of --data,
    validated on --val-data's or on the last --val-fraction of them. Bad lines are warned about
    on stderr (and in the description)."""
    if cfg.model != "gpt":
        raise ConfigError("--format chat trains a GPT: pass --model gpt")
    if not cfg.data:
        raise ConfigError("--format chat needs --data FILE.jsonl")
    template = template_for(cfg)
    train, notes = load_chat_files(cfg.data, "--data", template, tok, block_size)
    if cfg.val_data:
        val, more = load_chat_files(cfg.val_data, "--val-data", template, tok, block_size)
        notes += more
    else:
        if len(train) < 2:
            raise ConfigError(
                f"--data {' '.join(cfg.data)}: need at least 2 conversations, found {len(train)}"
            )
        n_val = max(1, int(len(train) * cfg.val_fraction))
        train, val = train[:-n_val], train[-n_val:]
    pad = tok.eot_token
    what = f"{' '.join(cfg.data)}: {len(train):,} training / {len(val):,} validation conversations"
    if cfg.val_data:
        what += f" (validation: {' '.join(cfg.val_data)})"
    what += ", loss on the assistant's tokens, each conversation one row padded to the batch's longest"
    if cfg.chat_template:
        what += (
            f"; rendered with --chat-template {cfg.chat_template}: serve the model with "
            f"gpt-serve --chat-template {cfg.chat_template}"
        )
    else:
        what += "; rendered with gpt-serve's default chat template"
    for note in notes:
        if is_main:
            print(f"gpt-train: warning: {note}", file=sys.stderr, flush=True)
    sampler = ChatSampler(train, block_size, cfg.batch_size, seed, pad)
    make_val = lambda s: ChatSampler(val, block_size, cfg.batch_size, s, pad)  # noqa: E731
    return sampler, make_val, what, (sample_prompt(val[0], tok), list(template.stop))


def chat_texts(cfg):
    """The training conversations' rendered texts (--tokenizer bpe learns from them)."""
    template = template_for(cfg)
    texts = []
    for path in find_files(cfg.data):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                texts.append(render(template, _messages(line))[0])
            except BadLine:
                continue
    held = 0 if cfg.val_data else max(1, int(len(texts) * cfg.val_fraction))
    return texts[: len(texts) - held]
