"""Token estimates of a chat request, before it is sent: for the token buckets and the cost budget.

An estimate only has to be good enough to reserve from a tokens-per-minute bucket or to bound a
call's worst-case cost: the answer's real usage settles the difference.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Token estimate: one token per CJK character, one per four other characters (as the fake server).
_CJK_RUNS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, per message
NON_TEXT_PART_TOKENS = 765  # an image part: a 1024x1024 image at high detail, a generous guess
DEFAULT_COMPLETION_TOKENS = 1000  # when the request sets no max_tokens


def estimate_tokens(request: dict[str, Any]) -> int:
    """A cheap upper-bound-ish guess of the tokens a chat request will use: prompt + ``max_tokens``.

    It only has to be good enough to reserve from the tokens-per-minute bucket: the real usage
    settles the difference once the answer arrives.
    """
    return estimate_prompt_tokens(request) + completion_budget(request)


def estimate_prompt_tokens(request: dict[str, Any]) -> int:
    """A guess of the prompt tokens of a chat request (messages, and schemas sent as prompt)."""
    prompt = 0
    for message in request.get("messages") or ():
        prompt += MESSAGE_OVERHEAD_TOKENS
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            prompt += _text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                prompt += _text_tokens(text) if isinstance(text, str) else NON_TEXT_PART_TOKENS
    for key in ("tools", "functions", "response_format"):  # schemas are sent as prompt tokens
        if request.get(key):
            prompt += _text_tokens(json.dumps(request[key], ensure_ascii=False))
    return prompt


def completion_budget(request: dict[str, Any]) -> int:
    """The most completion tokens a request allows: ``max_tokens`` (or a default) times ``n``."""
    completion = request.get("max_completion_tokens") or request.get("max_tokens")
    if not isinstance(completion, int) or completion < 1:
        completion = DEFAULT_COMPLETION_TOKENS
    choices = request.get("n")
    if isinstance(choices, int) and choices > 1:
        completion *= choices
    return completion


def _text_tokens(text: str) -> int:
    if text.isascii():  # O(1) in CPython: the common case skips the regex
        return (len(text) + 3) // 4
    cjk = sum(map(len, _CJK_RUNS.findall(text)))
    return cjk + (len(text) - cjk + 3) // 4
