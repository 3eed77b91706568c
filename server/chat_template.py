"""Chat messages -> one prompt string for a plain-text language model.

Our models are not instruction-tuned; they continue text. The default template lays a
conversation out the way such a model has most likely seen dialogue written:

    System: You are terse.
    User: Hi!
    Assistant: Hello.
    User: How are you?
    Assistant:

and generation stops at "\\nUser:" (or "\\nSystem:") so the model does not go on to write the
user's next turn. A template is configurable with a JSON file (`--chat-template FILE`):

    {"roles": {"system":    {"prefix": "System: ",    "suffix": "\\n"},
               "user":      {"prefix": "User: ",      "suffix": "\\n"},
               "assistant": {"prefix": "Assistant: ", "suffix": "\\n"}},
     "generation_prompt": "Assistant:",
     "stop": ["\\nUser:", "\\nSystem:"],
     "bos": ""}

`bos` goes before the first message; `generation_prompt` after the last, so the model writes
the assistant's turn. A role the template lacks is an error, except "developer" (OpenAI's newer
name for "system"), which falls back to the system role.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class RoleFormat:
    prefix: str = ""
    suffix: str = ""


@dataclass
class ChatTemplate:
    roles: dict[str, RoleFormat] = field(
        default_factory=lambda: {
            "system": RoleFormat("System: ", "\n"),
            "user": RoleFormat("User: ", "\n"),
            "assistant": RoleFormat("Assistant: ", "\n"),
            "tool": RoleFormat("Tool: ", "\n"),
        }
    )
    # No trailing space: GPT-2's BPE puts the space in front of the next word (" Hello"), so
    # ending the prompt with one would force an unlikely token split.
    generation_prompt: str = "Assistant:"
    stop: list[str] = field(default_factory=lambda: ["\nUser:", "\nSystem:"])
    bos: str = ""

    def format_for(self, role: str) -> RoleFormat:
        if role in self.roles:
            return self.roles[role]
        if role == "developer" and "system" in self.roles:
            return self.roles["system"]
        raise ValueError(f"the chat template has no role {role!r} (it knows {', '.join(self.roles)})")

    def render(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """(role, content) pairs -> the prompt text."""
        parts = [self.bos]
        for role, content in messages:
            fmt = self.format_for(role)
            parts += [fmt.prefix, content, fmt.suffix]
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    @classmethod
    def from_dict(cls, d: dict) -> ChatTemplate:
        if not isinstance(d, dict):
            raise ValueError("a chat template must be a JSON object")
        unknown = sorted(set(d) - {"roles", "generation_prompt", "stop", "bos"})
        if unknown:
            raise ValueError(f"unknown chat template keys {unknown}")
        roles = d.get("roles")
        if not isinstance(roles, dict) or not roles:
            raise ValueError('a chat template needs "roles": {"user": {"prefix": ..., "suffix": ...}, ...}')
        parsed = {}
        for role, fmt in roles.items():
            if (
                not isinstance(fmt, dict)
                or set(fmt) - {"prefix", "suffix"}
                or not all(isinstance(v, str) for v in fmt.values())
            ):
                raise ValueError(
                    f'role {role!r} must be {{"prefix": "...", "suffix": "..."}} with string values'
                )
            parsed[role] = RoleFormat(fmt.get("prefix", ""), fmt.get("suffix", ""))
        for needed in ("user", "assistant"):
            if needed not in parsed:
                raise ValueError(f"a chat template needs the role {needed!r}")
        stop = d.get("stop", [])
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError('"stop" must be a list of non-empty strings')
        for key in ("generation_prompt", "bos"):
            if not isinstance(d.get(key, ""), str):
                raise ValueError(f'"{key}" must be a string')
        return cls(
            roles=parsed, generation_prompt=d.get("generation_prompt", ""), stop=stop, bos=d.get("bos", "")
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        """Load a JSON template; any problem is a ValueError naming the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"{path}: cannot read the chat template ({e.strerror or e})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the chat template is not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def load_chat_template(path: str | None) -> ChatTemplate:
    return ChatTemplate() if path is None else ChatTemplate.from_file(path)
