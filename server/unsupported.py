"""The fields of OpenAI's or vLLM's API that would change the output but are not implemented
here: any value but the "off" one is a 400 naming the field, never silently dropped. The OpenAPI
schema lists them too (server/openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError

# (field, accepted values, why not)
UNSUPPORTED = {
    "functions": (([],), "function calling is not supported"),
    "function_call": (("none",), "function calling is not supported"),
    "typical_p": ((1, 1.0), "typical sampling is not supported"),
    "use_beam_search": ((False,), "use_beam_search is not supported: set num_beams > 1 for beam search"),
    "prompt_logprobs": ((), "vLLM's prompt_logprobs is not supported; use echo with logprobs (completions)"),
    "include_stop_str_in_output": ((False,), "including stop strings in the output is not supported"),
    "truncate_prompt_tokens": ((), "prompts are never truncated: a prompt that does not fit is a 400"),
    "modalities": ((["text"],), "only text output is supported"),
    "audio": ((), "audio output is not supported"),
    "reasoning_effort": ((), "this model does not reason"),
    "web_search_options": ((), "web search is not supported"),
}


COMPLETION_UNSUPPORTED = {
    "tools": (([],), "tool calls are a chat feature: use /v1/chat/completions"),
    "tool_choice": (("none",), "tool calls are a chat feature: use /v1/chat/completions"),
    "parallel_tool_calls": ((True, False), ""),
}


CHAT_UNSUPPORTED = {
    "echo": ((False,), "echo is not supported on chat completions"),
    "best_of": ((1,), "best_of is not supported on chat completions"),
    "suffix": ((), "suffix is not supported"),
}


def check_unsupported(data: Any, table=UNSUPPORTED) -> Any:
    if isinstance(data, dict):
        for name, (accepted, why) in table.items():
            value = data.get(name)
            if value is not None and not any(value == a and type(value) is type(a) for a in accepted):
                raise PydanticCustomError(
                    "unsupported", "{why}", {"name": name, "why": why or "invalid value"}
                )
    return data
