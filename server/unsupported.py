"""The fields of OpenAI's or vLLM's API that would change the output but are not implemented
here: any value but the "off" one is a 400 naming the field, never silently dropped. The OpenAPI
schema lists them too (server/openapi.py)."""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError

# (field, accepted values, why not)
UNSUPPORTED = {
    "response_format": (({"type": "text"},), "structured output (JSON mode, json_schema) is not supported"),
    "tools": (([],), "tool calling is not supported"),
    "tool_choice": (("none",), "tool calling is not supported"),
    "functions": (([],), "function calling is not supported"),
    "function_call": (("none",), "function calling is not supported"),
    "parallel_tool_calls": ((True, False), ""),
    "guided_json": ((), "guided decoding is not supported"),
    "guided_regex": ((), "guided decoding is not supported"),
    "guided_choice": ((), "guided decoding is not supported"),
    "guided_grammar": ((), "guided decoding is not supported"),
    "structured_outputs": ((), "guided decoding is not supported"),
    "typical_p": ((1, 1.0), "typical sampling is not supported"),
    "use_beam_search": ((False,), "use_beam_search is not supported: set num_beams > 1 for beam search"),
    "prompt_logprobs": ((), "vLLM's prompt_logprobs is not supported; use echo with logprobs (completions)"),
    "allowed_token_ids": ((), "allowed_token_ids is not supported; use logit_bias"),
    "bad_words": (([],), "bad_words is not supported; use logit_bias"),
    "include_stop_str_in_output": ((False,), "including stop strings in the output is not supported"),
    "truncate_prompt_tokens": ((), "prompts are never truncated: a prompt that does not fit is a 400"),
    "modalities": ((["text"],), "only text output is supported"),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "this model does not reason"),
    "web_search_options": ((), "web search is not supported"),
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
